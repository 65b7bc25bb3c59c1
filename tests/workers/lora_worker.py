"""Distributed worker: LoRA on our Megatron GLM vs peft on HF transformers, several layouts.

Launched by tests/test_lora.py under torchrun (2 gloo ranks). A tiny HF model and a random PEFT
adapter (``init_lora_weights=False``: A and B both non-zero) are the oracle: peft's loss and
adapter gradients on the same tokens. For each layout our model loads the HF base weights, gets
adapters for the same targets, loads the PEFT adapter file, and records loss and the worst
relative error of each adapter gradient (after Megatron's DDP + finalize_model_grads), and that
no base weight receives a gradient.
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
from glm_megatron.models.loading import build_glm_model, load_hf_into_model  # noqa: E402
from glm_megatron.models.lora import (  # noqa: E402
    ADAPTER_SUFFIX,
    LoraSettings,
    adaptable_linears,
    attach_lora,
    load_peft_adapter,
    peft_tensors,
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
}


def peft_reference(hf_dir, adapter_dir, ids, labels):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             labels.reshape(-1))
    loss.backward()
    grads = {n.replace(".default", ""): p.grad.detach().clone()
             for n, p in model.named_parameters() if p.grad is not None}
    base_grads = [n for n, p in model.named_parameters() if p.grad is not None and "lora_" not in n]
    assert not base_grads, base_grads
    return float(loss), grads


def adapter_grad_errors(chunks, cfg, peft_grads):
    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    worst, checked = 0.0, 0
    for chunk in chunks:
        for site in adaptable_linears(chunk.module, cfg):
            adapter = getattr(site.owner, site.base + ADAPTER_SUFFIX, None)
            if adapter is None:
                continue
            for hf_name, params in peft_tensors(site, adapter).items():
                full = peft_grads[hf_name]
                pieces = full.chunk(len(params), dim=0) if len(params) > 1 else [full]
                for (_, param), ref in zip(params, pieces):
                    if getattr(param, "tensor_model_parallel", False):
                        ref = ref.chunk(tp, dim=param.partition_dim)[rank]
                    err = float((param.main_grad - ref).abs().max() / ref.abs().max())
                    worst, checked = max(worst, err), checked + 1
    return worst, checked


def main():
    install_cpu_support()
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--adapter-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--layouts", default="tp1,tp2sp,pp2")
    args = parser.parse_args()

    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from safetensors.torch import load_file

    cfg = load_hf_config(args.hf_dir)
    adapter_cfg = json.load(open(os.path.join(args.adapter_dir, "adapter_config.json")))
    settings = LoraSettings(r=adapter_cfg["r"], alpha=adapter_cfg["lora_alpha"],
                            targets=tuple(adapter_cfg["target_modules"]),
                            rslora=adapter_cfg.get("use_rslora", False))
    tensors = load_file(os.path.join(args.adapter_dir, "adapter_model.safetensors"))
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=gen)
    labels = torch.randint(0, cfg.vocab_size, (2, 16), generator=gen)
    peft_loss, peft_grads = peft_reference(args.hf_dir, args.adapter_dir, ids, labels)

    results = {}
    for name in args.layouts.split(","):
        ctx = initialize_parallel(LAYOUTS[name], model_shape(cfg), seed=1)
        chunks, tconfig = build_glm_model(cfg, ctx.layout)
        load_hf_into_model(chunks, cfg, args.hf_dir)
        count = attach_lora(chunks, cfg, settings)
        used = load_peft_adapter(chunks, cfg, tensors, args.adapter_dir)
        ddp = [DistributedDataParallel(config=tconfig, module=c, ddp_config=
                                       DistributedDataParallelConfig(grad_reduce_in_fp32=True))
               for c in chunks]
        for c in ddp:
            c.zero_grad_buffer()
        loss = forward_backward_lm_loss(ddp, ids, labels)
        finalize_model_grads(ddp)
        worst, checked = adapter_grad_errors(ddp, cfg, peft_grads)
        trainable = [n for c in chunks for n, p in c.named_parameters() if p.requires_grad]
        gathered_used = [None] * dist.get_world_size()
        dist.all_gather_object(gathered_used, sorted(used))
        res = {"layout": ctx.layout.describe(), "adapter_params": count, "grad_max_rel_err": worst,
               "grads_checked": checked, "non_adapter_trainable":
               [n for n in trainable if ADAPTER_SUFFIX + ".adapters." not in n],
               "tensors_used_anywhere": len(set().union(*map(set, gathered_used)))}
        if loss is not None:
            res["loss"] = loss
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, res)
        results[name] = gathered
    if dist.get_rank() == 0:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({"peft_loss": peft_loss, "peft_tensors": len(tensors), "layouts": results},
                      fh, indent=1)
    destroy_parallel()


if __name__ == "__main__":
    main()
