#!/usr/bin/env python
"""Check our Megatron GLM model against HF transformers on the same tokens.

    torchrun --nproc-per-node 2 tools/verify_hf_parity.py --hf-dir D [--load CKPT] --tp 2
    python tools/verify_hf_parity.py --hf-dir D            # one process, TP=PP=EP=1

Loads the HF model with transformers and our model (from the HF weights, or from a Megatron
torch_dist checkpoint with --load) at the given layout, prints max |Δlogits| and top-1 agreement,
and exits 1 when they are outside the tolerance (2 on bad input).
"""

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--hf-dir", required=True, help="HF checkpoint directory (the reference)")
    parser.add_argument("--load", help="Megatron torch_dist checkpoint to test instead of the HF weights")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--etp", type=int, default=None)
    parser.add_argument("--num-layers", type=int, default=None,
                        help="compare only the first N decoder layers (for models too big for one host)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--max-abs-diff", type=float, default=None,
                        help="tolerance on max |Δlogits| (default 1e-3 for fp32, 0.5 for bf16)")
    parser.add_argument("--min-top1", type=float, default=0.99, help="minimum top-1 agreement")
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore")
    import torch

    from glm_megatron.models import ConfigError
    from glm_megatron.models.hf_mapping import MappingError
    from glm_megatron.models.parity import run_parity
    from glm_megatron.parallel import (
        LayoutError,
        ParallelLayout,
        destroy_parallel,
        install_cpu_support,
    )

    install_cpu_support()
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    tolerance = args.max_abs_diff or (1e-3 if args.dtype == "fp32" else 0.5)
    layout = ParallelLayout(
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
        expert_model_parallel_size=args.ep, expert_tensor_parallel_size=args.etp,
    )
    try:
        report = run_parity(
            args.hf_dir, layout, load=args.load, num_layers=args.num_layers,
            batch_size=args.batch_size, seq_len=args.seq_len, dtype=dtype,
        )
    except (ConfigError, LayoutError, MappingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ok = True
    if report is not None:
        ok = report.max_abs_diff <= tolerance and report.top1_agreement >= args.min_top1
        print(f"layout:           {report.layout}")
        print(f"weights:          {report.source}")
        print(f"tokens:           {report.tokens}")
        print(f"max |Δlogits|:    {report.max_abs_diff:.3e}  (tolerance {tolerance:.1e})")
        print(f"mean |Δlogits|:   {report.mean_abs_diff:.3e}")
        print(f"top-1 agreement:  {report.top1_agreement:.4f}  (minimum {args.min_top1})")
        print("PASS" if ok else "FAIL")
    verdict = torch.tensor([0 if ok else 1])
    torch.distributed.broadcast(verdict, src=0)
    destroy_parallel()
    return int(verdict.item())


if __name__ == "__main__":
    sys.exit(main())
