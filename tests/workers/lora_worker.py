"""Distributed worker: LoRA on our Megatron GLM vs peft on HF transformers, several layouts.

Launched by tests/test_lora.py under torchrun (2 gloo ranks). A tiny HF model and a random PEFT
adapter (``init_lora_weights=False``: A and B both non-zero; modules to save changed too) are the
oracle: peft's loss and adapter gradients on the same tokens. For each layout our model loads the
HF base weights, reads the PEFT directory with the library's reader, gets adapters for the same
targets, loads the adapter, and records loss and the worst relative error of each adapter
gradient and of each fully trained module's gradient (after Megatron's DDP +
finalize_model_grads), and that nothing else would train.

A layout written ``NAME@v4`` runs the second adapter (``--v4-adapter-dir``, the transformers-4
per-expert layout) against peft's own reading of it. ``--save-at`` writes the trainable tensors
(Megatron's adapter-only checkpoint + ``adapter_base.json``, as the trainers do) at that layout;
``--reload-at`` builds fresh adapters at another layout, loads that checkpoint and compares every
adapter and saved-module tensor with the PEFT file.
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from glm_megatron.models import load_hf_config  # noqa: E402
from glm_megatron.models.config import model_shape  # noqa: E402
from glm_megatron.models.forward import forward_backward_lm_loss  # noqa: E402
from glm_megatron.models.hf_mapping import combine, partition_dim, shard  # noqa: E402
from glm_megatron.models.loading import build_glm_model, load_hf_into_model  # noqa: E402
from glm_megatron.models.lora import (  # noqa: E402
    ADAPTER_SUFFIX,
    adaptable_linears,
    attach_lora,
    load_peft_adapter,
    local_piece,
    peft_tensors,
)
from glm_megatron.models.lora_experts import from_peft_layout  # noqa: E402
from glm_megatron.models.lora_files import BASE_FILE, adapter_base_record, read_peft_adapter  # noqa: E402
from glm_megatron.models.lora_saved_modules import (  # noqa: E402
    PEFT_PREFIX,
    SAVED_MODULE_ATTR,
    mapped_parameters,
)
from glm_megatron.parallel import (  # noqa: E402
    ParallelLayout,
    destroy_parallel,
    initialize_parallel,
    install_cpu_support,
)

LAYOUTS = {
    "tp1": ParallelLayout(),
    "tp2sp": ParallelLayout(tensor_model_parallel_size=2, sequence_parallel=True),
    "tp2": ParallelLayout(tensor_model_parallel_size=2),
    "pp2": ParallelLayout(pipeline_model_parallel_size=2),
    "ep2": ParallelLayout(expert_model_parallel_size=2),
    # TP folded with EP: each rank holds half of the experts, whole (expert TP 1).
    "tp2ep2": ParallelLayout(tensor_model_parallel_size=2, sequence_parallel=True,
                             expert_model_parallel_size=2, expert_tensor_parallel_size=1),
}


def peft_reference(hf_dir, adapter_dir, ids, labels, config, settings):
    """peft's loss and gradients, under our per-module names (peft's fused expert layout and
    modules_to_save wrappers undone)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             labels.reshape(-1))
    loss.backward()
    raw = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    others = [n for n in raw if "lora_" not in n and "modules_to_save" not in n]
    assert raw and not others, others
    grads = {n.replace(".default", "").replace(".modules_to_save", ""): g for n, g in raw.items()}
    # peft's config after its transformers-5 conversion says which fused parameters it wrapped.
    converted = {**config, "target_parameters": sorted(
        model.peft_config["default"].target_parameters or ())}
    return float(loss), from_peft_layout(grads, converted, settings, adapter_dir)


def rel_err(value, ref) -> float:
    return float((value - ref).abs().max() / ref.abs().max())


def adapter_errors(chunks, cfg, expected, grad: bool):
    """Worst relative error of this rank's adapter parameters (their main_grad if ``grad``)
    against ``expected`` (full per-module tensors), and how many were checked."""
    worst, checked = 0.0, 0
    for chunk in chunks:
        for site in adaptable_linears(chunk, cfg):
            adapter = getattr(site.owner, site.base + ADAPTER_SUFFIX, None)
            if adapter is None:
                continue
            for hf_name, params in peft_tensors(site, adapter).items():
                full = expected[hf_name]
                pieces = full.chunk(len(params), dim=0) if len(params) > 1 else [full]
                for (_, param), ref in zip(params, pieces):
                    ref = local_piece(ref, param, site)
                    worst = max(worst, rel_err(param.main_grad if grad else param.detach(), ref))
                    checked += 1
    return worst, checked


def saved_module_errors(chunks, cfg, expected, grad: bool):
    """The same for the parameters of the modules trained fully (lora_modules_to_save)."""
    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    worst, checked = 0.0, 0
    for chunk in chunks:
        for name, param, source in mapped_parameters(chunk, cfg):
            if not getattr(param, SAVED_MODULE_ATTR, False):
                continue
            full = combine(source, [expected[PEFT_PREFIX + n] for n in source.hf_names], cfg)
            ref = shard(full, source, partition_dim(name), rank, tp)
            worst = max(worst, rel_err(param.main_grad if grad else param.detach(), ref))
            checked += 1
    return worst, checked


def build(cfg, name, hf_dir, settings):
    ctx = initialize_parallel(LAYOUTS[name], model_shape(cfg), seed=1)
    chunks, tconfig = build_glm_model(cfg, ctx.layout)
    load_hf_into_model(chunks, cfg, hf_dir)
    count = attach_lora(chunks, cfg, settings)
    return ctx, chunks, tconfig, count


def gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run_layout(cfg, name, args, adapter, ids, labels, save):
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    settings, tensors, peft_loss, peft_grads = adapter
    ctx, chunks, tconfig, count = build(cfg, name, args.hf_dir, settings)
    used = load_peft_adapter(chunks, cfg, tensors, args.adapter_dir)
    if save:
        from glm_megatron.models.checkpoint import save_model_weights

        save_model_weights(chunks, args.ckpt, adapters_only=True)
        if dist.get_rank() == 0:
            with open(os.path.join(args.ckpt, BASE_FILE), "w", encoding="utf-8") as fh:
                json.dump(adapter_base_record(args.hf_dir, settings, cfg.model_type), fh)
    ddp = [DistributedDataParallel(config=tconfig, module=c, ddp_config=
                                   DistributedDataParallelConfig(grad_reduce_in_fp32=True))
           for c in chunks]
    for c in ddp:
        c.zero_grad_buffer()
    loss = forward_backward_lm_loss(ddp, ids, labels)
    finalize_model_grads(ddp)
    worst, checked = adapter_errors(chunks, cfg, peft_grads, grad=True)
    saved_worst, saved_checked = saved_module_errors(chunks, cfg, peft_grads, grad=True)
    trainable = [n for c in chunks for n, p in c.named_parameters() if p.requires_grad]
    saved_names = {n for c in chunks for n, p in c.named_parameters()
                   if getattr(p, SAVED_MODULE_ATTR, False)}
    res = {"layout": ctx.layout.describe(), "adapter_params": count, "grad_max_rel_err": worst,
           "grads_checked": checked, "saved_grad_max_rel_err": saved_worst,
           "saved_grads_checked": saved_checked,
           "non_adapter_trainable": [n for n in trainable if ADAPTER_SUFFIX + ".adapters." not in n
                                     and n not in saved_names],
           "saved_trainable": len(saved_names),
           "tensors_used_anywhere": len(set().union(*map(set, gather(sorted(used))))),
           "tensors_expected": len(tensors), "expected_loss": peft_loss}
    if loss is not None:
        res["loss"] = loss
    return gather(res)


def reload_layout(cfg, name, args, adapter):
    """Fresh adapters at ``name``, filled from the checkpoint another layout saved."""
    from glm_megatron.models.checkpoint import load_model_weights

    settings, tensors, _, _ = adapter
    _, chunks, _, _ = build(cfg, name, args.hf_dir, settings)
    fresh, _ = adapter_errors(chunks, cfg, tensors, grad=False)  # B starts at zero: far off
    saved_fresh, _ = saved_module_errors(chunks, cfg, tensors, grad=False)  # the base's values
    load_model_weights(chunks, args.ckpt, adapters_only=True)
    worst, checked = adapter_errors(chunks, cfg, tensors, grad=False)
    saved_worst, saved_checked = saved_module_errors(chunks, cfg, tensors, grad=False)
    return gather({"before_load_err": fresh, "saved_before_load_err": saved_fresh,
                   "max_err": worst, "checked": checked, "saved_max_err": saved_worst,
                   "saved_checked": saved_checked})


def main():
    install_cpu_support()
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--adapter-dir", required=True)
    parser.add_argument("--v4-adapter-dir", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--layouts", default="tp1,tp2sp,pp2")
    parser.add_argument("--save-at", default=None)
    parser.add_argument("--reload-at", default=None)
    parser.add_argument("--ckpt", default=None)
    args = parser.parse_args()

    cfg = load_hf_config(args.hf_dir)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=gen)
    labels = torch.randint(0, cfg.vocab_size, (2, 16), generator=gen)
    adapters = {}
    for key, directory in (("main", args.adapter_dir), ("v4", args.v4_adapter_dir)):
        if directory is None:
            continue
        settings, tensors, config = read_peft_adapter(directory, cfg)
        loss, grads = peft_reference(args.hf_dir, directory, ids, labels, config, settings)
        adapters[key] = (settings, tensors, loss, grads)

    results, reload = {}, None
    for name in args.layouts.split(","):
        layout, _, which = name.partition("@")
        results[name] = run_layout(cfg, layout, args, adapters[which or "main"], ids, labels,
                                   save=name == args.save_at)
    if args.reload_at:
        reload = reload_layout(cfg, args.reload_at, args, adapters["main"])
    if dist.get_rank() == 0:
        main_settings, main_tensors = adapters["main"][:2]
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({"peft_tensors": len(main_tensors), "layouts": results, "reload": reload,
                       "targets": list(main_settings.targets),
                       "modules_to_save": list(main_settings.modules_to_save),
                       "v4_tensors": len(adapters["v4"][1]) if "v4" in adapters else None},
                      fh, indent=1)
    destroy_parallel()


if __name__ == "__main__":
    main()
