#!/usr/bin/env bash
# Tiny reward-model stage for `make demo`: synthetic preferences, training on 2 CPU ranks (EP=2),
# evaluate-rm at TP=2 with a calibration plot, HF export.
set -euo pipefail
PY=${PY:-.venv/bin/python}
DATA=data/tiny_rm
OUT=output/tiny_rm
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CUDA_VISIBLE_DEVICES=""

echo "== 1/4 synthetic preference pairs + SentencePiece tokenizer -> $DATA"
$PY examples/tiny_rm/make_data.py --out "$DATA" > /dev/null
rm -rf "$OUT" "$OUT-hf"

echo "== 2/4 reward model on glm4-moe-tiny, 2 CPU ranks (EP=2), 60 steps"
$PY -m torch.distributed.run --nproc-per-node=2 --master-port="${MASTER_PORT:-29521}" \
    -m glm_megatron rm --config examples/tiny_rm/rm_tiny.yaml "checkpoint.output_dir=$OUT" \
    "$@" 2>&1 | grep -v -i "warn"

echo "== 3/4 evaluate-rm on held-out records (TP=2), calibration plot"
$PY -m torch.distributed.run --nproc-per-node=2 --master-port="${MASTER_PORT:-29522}" \
    -m glm_megatron evaluate-rm --load "$OUT/best" --test-data "$DATA/test.jsonl" \
    --output-file "$OUT/eval_test.json" --plot-calibration "$OUT/calibration.png" --tp 2 \
    2>&1 | grep -v -i "warn"

echo "== 4/4 export to HF sequence-classification layout -> $OUT-hf"
$PY tools/convert_checkpoint.py reward-to-hf --load "$OUT/best" --output-dir "$OUT-hf" \
    --tokenizer-dir "$DATA/tokenizer"
echo "calibration plot: $(pwd)/$OUT/calibration.png   eval: $(pwd)/$OUT/eval_test.json"
