#!/usr/bin/env bash
# The ChatGLM4 tutorial's data step for examples/glm4_9b_lora/sft_lora.yaml: Alpaca-zh records
# ({instruction, input, output}; the prompt is instruction + "\n\n" + input when input is not
# empty, as the tutorial's formatting_func) rendered with GLM-4-9B-chat's template (glm4), cut at
# the tutorial's 512 tokens, 5 % held out for evaluation (its train_test_split(0.05)).
#
#   examples/glm4_9b_lora/prepare_data.sh [ALPACA_JSON] [TOKENIZER_DIR] [OUT_DIR]
#
# defaults: data/alpaca_gpt4_data_zh.json, weights/glm-4-9b-chat-hf, data/glm4_9b_lora
# -> OUT_DIR/alpaca_zh_unified.jsonl (conversations), OUT_DIR/tokenized/{train,val} (what the
#    trainer reads), OUT_DIR/tokenized/summary.json. MAX_SEQ_LENGTH (default 512) and PY (default
#    python) from the environment; `make demo-lora` runs this script on its tiny data.
#
# The data (42,677 records), from the tutorial's repository or the Hugging Face hub:
#   wget -O data/alpaca_gpt4_data_zh.json \
#       https://raw.githubusercontent.com/SwanHubX/glm4-finetune/main/data/alpaca_gpt4_data_zh.json
#   huggingface-cli download --repo-type dataset --local-dir data/alpaca_gpt4_zh llamafactory/alpaca_gpt4_zh
#   (then pass the JSON file it holds as ALPACA_JSON)
set -euo pipefail
PY=${PY:-python}
INPUT=${1:-data/alpaca_gpt4_data_zh.json}
TOKENIZER=${2:-weights/glm-4-9b-chat-hf}
OUT=${3:-data/glm4_9b_lora}
MAX_SEQ_LENGTH=${MAX_SEQ_LENGTH:-512}
TOOLS=$(cd "$(dirname "$0")/../../tools" && pwd)   # runs from any directory

if [ ! -f "$INPUT" ]; then
    echo "error: $INPUT: no such file (download commands: the header of $0)" >&2
    exit 2
fi
mkdir -p "$OUT"

# 1. unify: Alpaca -> conversations (user = instruction [+ "\n\n" + input], assistant = output).
#    --input-format alpaca: every record must be an Alpaca record; --skip-invalid counts and
#    skips malformed ones instead of stopping at the first.
$PY "$TOOLS/prepare_sft_data.py" --input-files "$INPUT" --output-file "$OUT/alpaca_zh_unified.jsonl" \
    --format conversations --input-format alpaca --skip-invalid

# 2. tokenize with GLM-4-9B-chat's chat template; loss on the assistant tokens (+ the turn's
#    terminator). --truncate cuts rows longer than MAX_SEQ_LENGTH from the right (TRL's
#    max_seq_length); a row whose prompt alone fills MAX_SEQ_LENGTH has nothing left to learn and
#    is skipped and counted (--skip-invalid). --validation-split 0.05 -> OUT/tokenized/val.
rm -rf "$OUT/tokenized"
$PY "$TOOLS/tokenize_data.py" --input "$OUT/alpaca_zh_unified.jsonl" --output "$OUT/tokenized" \
    --tokenizer-path "$TOKENIZER" --format sft --template glm4 \
    --max-seq-length "$MAX_SEQ_LENGTH" --truncate --validation-split 0.05 --skip-invalid
