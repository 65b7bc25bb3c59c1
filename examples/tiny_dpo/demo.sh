#!/usr/bin/env bash
# `make demo-dpo`: SFT -> DPO on 2 CPU ranks (EP=2) with one tokenizer, then what DPO changed in
# the policy's replies, through transformers alone on the HF exports.
set -euo pipefail
PY=${PY:-.venv/bin/python}
DATA=data/tiny_dpo
OUT=output/tiny_dpo
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CUDA_VISIBLE_DEVICES=""
quiet() { grep -v -i -E "warn|return func|load_state_dict\(|Loading weights" || true; }
run() { $PY -m torch.distributed.run --nproc-per-node=2 --master-port="$1" -m glm_megatron "${@:2}" 2>&1 | quiet; }

echo "== 1/5 synthetic SFT and preference data + one BPE tokenizer -> $DATA"
$PY examples/tiny_ppo/make_data.py --out "$DATA" > /dev/null
rm -rf "$OUT"

echo "== 2/5 SFT of glm4-moe-tiny (random mix of positive and negative words), EP=2"
run "${MASTER_PORT:-29551}" sft --config examples/tiny_ppo/sft.yaml "checkpoint.output_dir=$OUT/sft" \
    "data.train_data_path=$DATA/tokenized_sft_train/train" \
    "data.validation_data_path=$DATA/tokenized_sft_val/train" logging.progress_bar=false

echo "== 3/5 DPO from the SFT model (reference: a frozen copy of it), EP=2"
run "${MASTER_PORT2:-29552}" dpo --config examples/tiny_dpo/dpo.yaml "checkpoint.output_dir=$OUT/dpo" \
    "model.load_checkpoint=$OUT/sft/best" "$@"

echo "== 4/5 export both policies to HF -> $OUT/sft-hf, $OUT/dpo-hf"
for stage in sft dpo; do
    $PY tools/convert_checkpoint.py megatron-to-hf --load "$OUT/$stage/best" \
        --output-dir "$OUT/$stage-hf" --tokenizer-dir "$DATA/tokenizer" 2>&1 | quiet
done

echo "== 5/5 sampled replies to held-out prompts, before and after DPO (transformers)"
$PY examples/tiny_dpo/valence.py "$OUT/sft-hf" "$OUT/dpo-hf" "$DATA/prompts_val.jsonl" 2>&1 | quiet
echo "DPO log: $(pwd)/$OUT/dpo/train_log.jsonl   TensorBoard: tensorboard --logdir $OUT"
