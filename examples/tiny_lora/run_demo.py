#!/usr/bin/env python
"""`make demo-lora`: the ChatGLM4 tutorial's LoRA recipe end to end on a tiny GLM-4-9B-shaped
model, on 2 CPU ranks (TP=2 + SP), in a few minutes.

1. synthetic Alpaca-zh data ({instruction, input, output}; examples/tiny_lora/make_data.py) and a
   byte-level BPE tokenizer with GLM-4-9B-chat's template;
2. examples/glm4_9b_lora/prepare_data.sh, the GLM-4-9B example's data step: tools/prepare_sft_data.py,
   then tools/tokenize_data.py --template glm4 --validation-split 0.05 (the tutorial's 5 % split);
3. a random GlmForCausalLM saved in HF format (examples/tiny_lora/make_base.py);
4. a few full-SFT steps on English instructions (pretrain.yaml) so the base has skills to re-use,
   exported to HF: OUT/base-hf, the LoRA base (what glm-4-9b-chat-hf is in the tutorial);
5. LoRA SFT with the tutorial's LoRA keys (lora.yaml: r 8, alpha 32, dropout 0.1 on q/k/v) with
   model.hf_checkpoint = OUT/base-hf, held-out eval loss before (eval_at_start) and after;
6. exports: OUT/adapter-hf (--adapter-only, PEFT format) and OUT/merged-hf (merged);
7. the tutorial's test step: greedy answers through transformers + peft on the adapter, and the
   merged export checked to answer the same.

    python examples/tiny_lora/run_demo.py [--data data/tiny_lora] [--out output/tiny_lora]
        [--no-pretrain] [dotted.key=value ... (LoRA run overrides)]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import make_base  # noqa: E402
import make_data  # noqa: E402

MAX_SEQ_LENGTH = 64
QUIET = re.compile(r"warn|return func|load_state_dict\(|Loading weights|Writing model shards|"
                   r"megatron-to-hf:.*tensor/s|right-padding", re.I)
EVAL = re.compile(r"^eval @ step (\d+) \| eval_loss ([0-9.]+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")


def run(cmd: list[str]) -> list[str]:
    """Run ``cmd`` in the repository, print its lines (less the noise), return them all."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if line.strip() and not QUIET.search(line):
            print("   " + line.rstrip("\n"), flush=True)
    if proc.wait() != 0:
        print("\n".join(lines[-40:]), file=sys.stderr)  # unfiltered: the error in full
        sys.exit(f"error: exited {proc.returncode}: {' '.join(cmd)}")
    return lines


def glm(*args: str) -> list[str]:
    return run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                f"--master-port={free_port()}", "-m", "glm_megatron", *args])


def tool(name: str, *args: str) -> list[str]:
    return run([sys.executable, f"tools/{name}", *args])


def evals(lines: list[str]) -> list[tuple[int, float]]:
    return [(int(m[1]), float(m[2])) for m in map(EVAL.match, lines) if m]


def tensors_in(directory: Path) -> tuple[int, int]:
    """(parameters, bytes) of the safetensors files of an HF / PEFT directory."""
    from safetensors import safe_open

    count, size = 0, 0
    for file in sorted(directory.glob("*.safetensors")):
        size += file.stat().st_size
        with safe_open(str(file), "pt") as fh:
            count += sum(math.prod(fh.get_slice(name).get_shape()) for name in fh.keys())
    return count, size


def prepare(data: Path, name: str) -> Path:
    """examples/glm4_9b_lora/prepare_data.sh (the GLM-4-9B example's data step, 64 tokens instead
    of 512) on DATA/NAME.json: unify, then tokenize -> DATA/NAME/tokenized/{train,val}."""
    run(["env", f"PY={sys.executable}", f"MAX_SEQ_LENGTH={MAX_SEQ_LENGTH}", "bash",
         "examples/glm4_9b_lora/prepare_data.sh", str(data / f"{name}.json"),
         str(data / "tokenizer"), str(data / name)])
    return data / name / "tokenized"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/tiny_lora")
    p.add_argument("--out", default="output/tiny_lora")
    p.add_argument("--no-pretrain", action="store_true",
                   help="LoRA on the random base itself (skip the full-SFT steps)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value for the LoRA run")
    args = p.parse_args(argv)
    started = time.time()
    data, out = REPO / args.data, REPO / args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    print(f"== 1/7 synthetic Alpaca-zh data + BPE tokenizer (glm4 template) -> {args.data}")
    info = make_data.build(str(data))
    print(f"   {info['pretrain']}, {info['lora']}: {{instruction, input, output}} records; "
          f"tokenizer {info['vocab_size']} tokens")

    print("== 2/7 examples/glm4_9b_lora/prepare_data.sh: prepare_sft_data.py, tokenize_data.py "
          "--template glm4 --validation-split 0.05")
    tok_pretrain, tok_lora = prepare(data, "pretrain"), prepare(data, "alpaca_zh")

    print(f"== 3/7 random GlmForCausalLM (GLM-4-9B's architecture, tiny) -> {args.out}/init-hf")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    base_info = make_base.make_base(str(out / "init-hf"), info["tokenizer"])
    print(f"   {base_info['parameters']:,} parameters, vocab {base_info['vocab_size']}")

    base_hf = out / "init-hf"
    if not args.no_pretrain:
        print("== 4/7 a few full-SFT steps on English instructions (2 ranks, TP=2+SP), "
              f"export -> {args.out}/base-hf")
        glm("sft", "--config", "examples/tiny_lora/pretrain.yaml",
            f"model.hf_checkpoint={out / 'init-hf'}",
            f"data.train_data_path={tok_pretrain / 'train'}",
            f"data.validation_data_path={tok_pretrain / 'val'}",
            f"checkpoint.output_dir={out / 'pretrain'}")
        base_hf = out / "base-hf"
        tool("convert_checkpoint.py", "megatron-to-hf", "--load", str(out / "pretrain"),
             "--output-dir", str(base_hf), "--hf-config-dir", str(out / "init-hf"))
    else:
        print("== 4/7 skipped (--no-pretrain): the random init-hf is the LoRA base")

    print("== 5/7 LoRA SFT (r 8, alpha 32, dropout 0.1, q/k/v) on base-hf, 2 ranks TP=2+SP")
    lines = glm("sft", "--config", "examples/tiny_lora/lora.yaml",
                f"model.hf_checkpoint={base_hf}",
                f"data.train_data_path={tok_lora / 'train'}",
                f"data.validation_data_path={tok_lora / 'val'}",
                f"checkpoint.output_dir={out / 'lora'}", *args.overrides)
    losses = evals(lines)

    print(f"== 6/7 export: {args.out}/adapter-hf (--adapter-only, PEFT) and {args.out}/merged-hf")
    tool("convert_checkpoint.py", "megatron-to-hf", "--load", str(out / "lora"),
         "--output-dir", str(out / "adapter-hf"), "--adapter-only")
    tool("convert_checkpoint.py", "megatron-to-hf", "--load", str(out / "lora"),
         "--output-dir", str(out / "merged-hf"))

    print("== 7/7 the tutorial's test step: transformers + peft on the adapter (greedy)")
    prompts = ["你好，告诉我你的名字。", "告诉我1+2等于多少？", "把这些数字倒过来写。\n\n3 8 1 5",
               "请原样重复下面的数字。\n\n7 2 9", "把下面的英文单词翻译成中文。\n\ncat red"]
    chat = run([sys.executable, str(HERE / "chat_peft.py"), "--base", str(base_hf),
                "--adapter", str(out / "adapter-hf"), "--merged", str(out / "merged-hf"),
                *prompts])

    (adapter_params, adapter_bytes), (base_params, base_bytes) = (tensors_in(out / "adapter-hf"),
                                                                  tensors_in(base_hf))
    print("\nsummary")
    if losses:
        (s0, first), (s1, last) = losses[0], losses[-1]
        print(f"  held-out eval loss (5 % split): {first:.4f} (step {s0}, the base) -> "
              f"{last:.4f} (step {s1}, base + LoRA)")
    print(f"  adapter: {adapter_params:,} parameters, {adapter_bytes / 1024:.0f} KiB "
          f"({out / 'adapter-hf'})")
    print(f"  base:    {base_params:,} parameters, {base_bytes / 2**20:.2f} MiB ({base_hf}); "
          f"the adapter is {100 * adapter_bytes / base_bytes:.1f} % of it")
    print(f"  merged model: {out / 'merged-hf'} "
          f"({'same answers as base + adapter' if any('the same' in c for c in chat) else 'CHECK'})")
    print(f"  wall time {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
