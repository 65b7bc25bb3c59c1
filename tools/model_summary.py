#!/usr/bin/env python
"""Print a GLM model's total / active parameters and per-rank memory at a parallel layout.

    python tools/model_summary.py --preset glm4.6-355b-a32b --tp 8 --pp 4 --ep 16 --etp 1
    python tools/model_summary.py --hf-config /path/to/GLM-4.6
    python tools/model_summary.py --preset glm4-9b --tp 2 --lora-r 8 --lora-targets q_proj,k_proj,v_proj

The model is built by the real builder on the meta device (no memory, no GPU).
"""

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="named preset (e.g. glm4.6-355b-a32b)")
    source.add_argument("--hf-config", help="HF checkpoint directory or config.json")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    parser.add_argument("--ep", type=int, default=1, help="expert parallel size")
    parser.add_argument("--etp", type=int, default=None, help="expert tensor parallel size (default: TP)")
    parser.add_argument("--cp", type=int, default=1, help="context parallel size")
    parser.add_argument("--world-size", type=int, default=0,
                        help="total ranks (default: the smallest that fits the layout); sets DP")
    parser.add_argument("--no-mtp", action="store_true", help="leave the MTP layer out")
    parser.add_argument("--lora-r", type=int, default=None, metavar="R",
                        help="also show LoRA adapters of rank R: trainable parameters and the "
                             "memory of a LoRA run (frozen bf16 base)")
    parser.add_argument("--lora-targets", "--lora-target-modules", dest="lora_targets",
                        default=None, metavar="NAMES",
                        help="HF module names, comma separated, or all-linear "
                             "(default: q_proj,k_proj,v_proj, as the trainers; on MoE models "
                             "gate_proj,up_proj,down_proj are the routed experts)")
    args = parser.parse_args(argv)
    if args.lora_r is None and args.lora_targets is not None:
        parser.error("--lora-targets needs --lora-r")
    if args.lora_r is not None and args.lora_r < 1:
        parser.error("--lora-r must be >= 1")

    warnings.filterwarnings("ignore")
    from glm_megatron.models import ConfigError, get_preset, load_hf_config
    from glm_megatron.models.config import model_shape
    from glm_megatron.parallel import LayoutError, ParallelLayout, validate_layout
    from glm_megatron.parallel.layout import minimal_world_size

    try:
        cfg = get_preset(args.preset) if args.preset else load_hf_config(args.hf_config)
        layout = ParallelLayout(
            tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
            expert_model_parallel_size=args.ep, expert_tensor_parallel_size=args.etp,
            context_parallel_size=args.cp,
        )
        # Validate before importing Megatron-Core (seconds) so bad input answers at once.
        validate_layout(layout, args.world_size or minimal_world_size(layout), model_shape(cfg))
        from glm_megatron.models.summary import format_summary, summarize
        from glm_megatron.parallel import install_cpu_support

        lora = None
        if args.lora_r is not None:
            from glm_megatron.models.lora import LoraSettings, check_expert_layout, resolve_targets

            targets = [t.strip() for t in (args.lora_targets or "q_proj,k_proj,v_proj").split(",")]
            lora = LoraSettings(r=args.lora_r, targets=resolve_targets(cfg, targets,
                                                                       key="--lora-targets"))
            check_expert_layout(cfg, lora.targets, layout.etp, layout.tp, key="--etp")
        install_cpu_support()
        summary = summarize(cfg, layout, world_size=args.world_size,
                            include_mtp=not args.no_mtp and cfg.num_nextn_predict_layers > 0,
                            lora=lora)
    except (ConfigError, LayoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(summary, args.preset or args.hf_config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
