#!/usr/bin/env bash
# `make demo`: the whole pipeline on 2 CPU ranks with one tokenizer: tiny SFT -> tiny reward model
# (started from the SFT model) -> tiny PPO (policy and reference = the SFT model) -> HF export of
# the policy -> a chat reply through transformers alone.
set -euo pipefail
PY=${PY:-.venv/bin/python}
DATA=data/tiny_ppo
OUT=output/tiny_ppo
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CUDA_VISIBLE_DEVICES=""
quiet() { grep -v -i -E "warn|return func|load_state_dict\(" || true; }
run() { $PY -m torch.distributed.run --nproc-per-node=2 --master-port="$1" -m glm_megatron "${@:2}" 2>&1 | quiet; }

echo "== 1/6 synthetic SFT, preference and prompt data + one BPE tokenizer -> $DATA"
$PY examples/tiny_ppo/make_data.py --out "$DATA" > /dev/null
rm -rf "$OUT"

echo "== 2/6 SFT of glm4-moe-tiny on 2 CPU ranks (EP=2)"
run "${MASTER_PORT:-29531}" sft --config examples/tiny_ppo/sft.yaml "checkpoint.output_dir=$OUT/sft"

echo "== 3/6 reward model started from the SFT model (EP=2)"
run "${MASTER_PORT2:-29532}" rm --config examples/tiny_ppo/rm.yaml "checkpoint.output_dir=$OUT/rm" \
    "model.load_checkpoint=$OUT/sft/best"

echo "== 4/6 PPO: policy + value head, frozen reference and reward model, KV-cache rollouts (EP=2)"
run "${MASTER_PORT3:-29533}" ppo --config examples/tiny_ppo/ppo.yaml "checkpoint.output_dir=$OUT/ppo" \
    "rlhf.policy_model=$OUT/sft/best" "rlhf.reward_model=$OUT/rm/best" "$@"

echo "== 5/6 export the policy to HF -> $OUT/ppo-hf"
$PY tools/convert_checkpoint.py megatron-to-hf --load "$OUT/ppo/latest" --output-dir "$OUT/ppo-hf" \
    --tokenizer-dir "$DATA/tokenizer" 2>&1 | quiet

echo "== 6/6 chat with the exported policy through transformers (apply_chat_template + generate)"
$PY examples/tiny_ppo/chat.py "$OUT/ppo-hf" "Describe the lamp 7." "Describe the river 42."

echo
echo "what each stage achieved:"
$PY examples/tiny_ppo/summary.py "$OUT"
echo "PPO log: $(pwd)/$OUT/ppo/ppo_log.jsonl   samples: $(pwd)/$OUT/ppo/samples.jsonl"
echo "TensorBoard: tensorboard --logdir $OUT   (sft/, rm/, ppo/ runs)"
