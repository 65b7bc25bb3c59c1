#!/usr/bin/env python
"""Convert GLM-4.x checkpoints between HF safetensors and Megatron torch_dist.

    python tools/convert_checkpoint.py hf-to-megatron --hf-dir D --output-dir O [--tp N --pp N --ep N]
    torchrun --nproc-per-node 8 tools/convert_checkpoint.py hf-to-megatron --hf-dir D --output-dir O --tp 8
    python tools/convert_checkpoint.py megatron-to-hf --load CKPT --output-dir D [--hf-config-dir D0]
    python tools/convert_checkpoint.py reward-to-hf --load RM_CKPT --output-dir D [--tokenizer-dir T]

The torch_dist checkpoint stores global tensors: it loads at any TP/PP/EP layout. The conversion
layout only spreads the work and memory over the ranks (each reads only the tensors it needs).
``reward-to-hf`` writes a reward model (``glm_megatron rm``) in HF's sequence-classification
layout (``model.*`` + ``score.weight``); it runs in one process.
Exit status: 0 done, 2 bad input (the message names the file, tensor or key).
"""

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    sub = parser.add_subparsers(dest="command", required=True)

    a = sub.add_parser("hf-to-megatron", help="HF safetensors -> Megatron torch_dist weights")
    a.add_argument("--hf-dir", required=True, help="HF checkpoint (config.json + safetensors)")
    a.add_argument("--output-dir", required=True)
    a.add_argument("--tp", type=int, default=1, help="tensor parallel size used to convert")
    a.add_argument("--pp", type=int, default=1, help="pipeline parallel size used to convert")
    a.add_argument("--ep", type=int, default=1, help="expert parallel size used to convert")
    a.add_argument("--etp", type=int, default=None, help="expert tensor parallel size (default TP)")
    a.add_argument("--preset",
                   help="also check the config against this preset (names any field that differs)")
    a.add_argument("--dtype", choices=sorted(DTYPES), help="parameter dtype (default: the checkpoint's)")
    a.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")

    b = sub.add_parser("megatron-to-hf", help="Megatron torch_dist weights -> HF directory")
    b.add_argument("--load", required=True,
                   help="weights dir, trainer iter_* dir, or trainer checkpoint dir (uses 'latest')")
    b.add_argument("--output-dir", required=True)
    b.add_argument("--hf-config-dir",
                   help="original HF model dir: its config.json (and tokenizer) are used")
    b.add_argument("--tokenizer-dir", help="tokenizer files to ship with the model")
    b.add_argument("--dtype", choices=sorted(DTYPES), help="output dtype (default: as converted from)")
    b.add_argument("--max-shard-size-gb", type=float, default=5.0)
    b.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    b.add_argument("--adapter-only", action="store_true",
                   help="a LoRA run: write its PEFT adapter (adapter_config.json + "
                        "adapter_model.safetensors) instead of the merged model")

    c = sub.add_parser("reward-to-hf",
                       help="reward-model checkpoint -> HF sequence-classification directory")
    c.add_argument("--load", required=True,
                   help="reward run dir (uses 'latest'), its best / latest marker, iter_* or weights dir")
    c.add_argument("--output-dir", required=True)
    c.add_argument("--tokenizer-dir", help="tokenizer files to ship with the model")
    c.add_argument("--dtype", choices=sorted(DTYPES), help="output dtype (default: as trained)")
    c.add_argument("--max-shard-size-gb", type=float, default=5.0)
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    return parser.parse_args(argv)


def hf_to_megatron(args) -> None:
    import torch

    from glm_megatron.conversion.hf_to_megatron import convert_hf_to_megatron
    from glm_megatron.models import get_preset
    from glm_megatron.parallel import ParallelLayout, destroy_parallel, install_cpu_support

    install_cpu_support()  # builds Megatron's groups and model (megatron-to-hf needs neither)
    layout = ParallelLayout(
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
        expert_model_parallel_size=args.ep, expert_tensor_parallel_size=args.etp,
    )
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    summary = convert_hf_to_megatron(
        args.hf_dir, args.output_dir, layout, overwrite=args.overwrite, params_dtype=dtype,
        preset=get_preset(args.preset) if args.preset else None,
    )
    if torch.distributed.get_rank() == 0:
        mtp = "kept" if summary["mtp"] else "absent"
        print(f"wrote {args.output_dir}: {summary['tensors']} HF tensors, "
              f"{summary['bytes'] / 2**30:.3f} GiB written by all ranks, MTP {mtp}, "
              f"converted at {summary['layout']} in {summary['seconds']:.1f} s")
    destroy_parallel()


def megatron_to_hf(args) -> None:
    import torch
    import torch.distributed as dist

    from glm_megatron.conversion.megatron_to_hf import convert_megatron_to_hf
    from glm_megatron.parallel import read_launch_env

    env = read_launch_env()
    if env.world_size > 1:
        dist.init_process_group("gloo", rank=env.rank, world_size=env.world_size)
    summary = convert_megatron_to_hf(
        args.load, args.output_dir, hf_config_dir=args.hf_config_dir,
        tokenizer_dir=args.tokenizer_dir,
        dtype=getattr(torch, DTYPES[args.dtype]) if args.dtype else None,
        max_shard_bytes=int(args.max_shard_size_gb * 2**30), overwrite=args.overwrite,
        rank=env.rank, world_size=env.world_size,
        barrier=dist.barrier if env.world_size > 1 else (lambda: None),
        adapter_only=args.adapter_only,
    )
    if env.rank == 0 and args.adapter_only:
        print(f"wrote {args.output_dir}: PEFT LoRA adapter, {summary['tensors']} tensors "
              f"(base: {summary['base']}), in {summary['seconds']:.1f} s")
    elif env.rank == 0:
        tok = ", tokenizer: " + " ".join(summary["tokenizer"]) if summary.get("tokenizer") else ""
        print(f"wrote {args.output_dir}: {summary['tensors']} tensors in {summary['shards']} "
              f"shard(s), {summary['bytes'] / 2**30:.3f} GiB, MTP "
              f"{'kept' if summary['mtp'] else 'absent'}{tok}, in {summary['seconds']:.1f} s")
    if env.world_size > 1:
        dist.destroy_process_group()


def reward_to_hf(args) -> None:
    import torch

    from glm_megatron.conversion.reward_export import export_reward_to_hf
    from glm_megatron.models import ConfigError
    from glm_megatron.parallel import read_launch_env

    if read_launch_env().world_size > 1:
        raise ConfigError("reward-to-hf runs in one process: start it with python, not torchrun")
    summary = export_reward_to_hf(
        args.load, args.output_dir, tokenizer_dir=args.tokenizer_dir,
        dtype=getattr(torch, DTYPES[args.dtype]) if args.dtype else None,
        max_shard_bytes=int(args.max_shard_size_gb * 2**30), overwrite=args.overwrite,
    )
    tok = ", tokenizer: " + " ".join(summary["tokenizer"]) if summary["tokenizer"] else ""
    print(f"wrote {args.output_dir}: reward model, {summary['tensors']} tensors in "
          f"{summary['shards']} shard(s), {summary['bytes'] / 2**30:.3f} GiB, MTP "
          f"{'kept' if summary['mtp'] else 'absent'}{tok}, in {summary['seconds']:.1f} s")


COMMANDS = {"hf-to-megatron": hf_to_megatron, "megatron-to-hf": megatron_to_hf,
            "reward-to-hf": reward_to_hf}


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    from glm_megatron.data.errors import DataValidationError
    from glm_megatron.models import ConfigError
    from glm_megatron.models.hf_mapping import MappingError
    from glm_megatron.parallel import LaunchEnvError, LayoutError

    try:
        COMMANDS[args.command](args)
    except (ConfigError, LayoutError, LaunchEnvError, MappingError, DataValidationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
