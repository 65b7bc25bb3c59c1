"""Distributed worker: our Megatron GLM vs HF transformers at several layouts in one launch.

The HF reference is whatever class the checkpoint's config.json names (``Glm4MoeForCausalLM``,
``GlmForCausalLM`` or ``Glm4ForCausalLM``), loaded through ``AutoModelForCausalLM``.

Launched by tests/test_hf_parity.py under torchrun (gloo). For each layout it builds the model
through the shared parallel layer, loads the HF weights, and records (on rank 0, as JSON):
logits difference and top-1 agreement, LM loss, and the worst relative gradient error after one
backward pass through Megatron's DDP + finalize_model_grads (the production gradient path).
Layouts run one after another in the same process group so Megatron is imported once.
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from glm_megatron.models import load_hf_config  # noqa: E402
from glm_megatron.models.checkpoint import load_model_weights, save_model_weights  # noqa: E402
from glm_megatron.models.config import model_shape  # noqa: E402
from glm_megatron.models.forward import forward_backward_lm_loss, forward_logits  # noqa: E402
from glm_megatron.models.hf_checkpoint import HFCheckpointReader  # noqa: E402
from glm_megatron.models.hf_mapping import combine, iter_local_tensors, shard  # noqa: E402
from glm_megatron.models.loading import build_glm_model, load_hf_into_model  # noqa: E402
from glm_megatron.parallel import (  # noqa: E402
    ParallelLayout,
    destroy_parallel,
    initialize_parallel,
    install_cpu_support,
)

LAYOUTS = {
    "tp1": ParallelLayout(),
    "tp2sp": ParallelLayout(tensor_model_parallel_size=2, sequence_parallel=True),
    "ep2": ParallelLayout(expert_model_parallel_size=2),
    "pp2": ParallelLayout(pipeline_model_parallel_size=2),
    "pp2vpp2": ParallelLayout(pipeline_model_parallel_size=2,
                              virtual_pipeline_model_parallel_size=2),
    "tp2ep2": ParallelLayout(tensor_model_parallel_size=2, expert_model_parallel_size=2,
                             expert_tensor_parallel_size=1,
                             sequence_parallel=True),
}


def hf_reference(hf_dir, ids, labels):
    from transformers import AutoModelForCausalLM

    from helpers.tiny_hf import hf_grads_by_disk_name

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    loss.backward()
    return logits.detach(), float(loss), hf_grads_by_disk_name(model)


def ranks():
    from megatron.core import parallel_state as ps

    return dict(
        tp=(ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
        etp=(ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()),
        ep=(ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()),
    )


def grad_errors(chunks, cfg, hf_grads):
    """Worst relative error of this rank's gradients against HF's (sharded the same way)."""
    r = ranks()
    worst, worst_name, checked = 0.0, None, 0
    for chunk in chunks:
        for item in iter_local_tensors(chunk.module, cfg, ep_rank=r["ep"][0], ep_size=r["ep"][1]):
            if not item.tensor.requires_grad:
                continue
            ref = combine(item.source, [hf_grads[n] for n in item.source.hf_names], cfg)
            rank, size = r["etp"] if item.expert else r["tp"]
            ref = shard(ref, item.source, item.partition_dim, rank, size)
            ours = item.tensor.main_grad.float()
            err = float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
            checked += 1
            if err > worst:
                worst, worst_name = err, item.name
    return worst, worst_name, checked


def check_mtp_and_checkpoint(cfg, layout, ckpt, reader):
    """MTP (when the model has one) builds and loads from the HF tensors; a torch_dist
    save/load round-trips every tensor."""
    chunks, _ = build_glm_model(cfg, layout, build_mtp=True)
    load_hf_into_model(chunks, cfg, reader)
    model = chunks[0]
    mtp_params = [n for n, _ in model.named_parameters() if n.startswith("mtp.")]
    save_model_weights(chunks, ckpt)
    fresh, _ = build_glm_model(cfg, layout, build_mtp=True)
    load_model_weights(fresh, ckpt)
    mismatched = [
        n for (n, a), (_, b) in zip(model.state_dict().items(), fresh[0].state_dict().items())
        if isinstance(a, torch.Tensor) and not torch.equal(a, b)
    ]
    return {"mtp_params": len(mtp_params), "ckpt_mismatched": mismatched}


def main():
    install_cpu_support()
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--layouts", default="tp1,tp2sp,ep2,pp2")
    parser.add_argument("--mtp-layouts", default="tp2sp,ep2",
                        help="layouts that also check MTP loading and a torch_dist round trip")
    parser.add_argument("--ckpt-dir", required=True, help="torch_dist checkpoints go here, per layout")
    args = parser.parse_args()

    cfg = load_hf_config(args.hf_dir)
    reader = HFCheckpointReader(args.hf_dir)
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=gen)
    labels = torch.randint(0, cfg.vocab_size, (2, 16), generator=gen)
    hf_logits, hf_loss, hf_grads = hf_reference(args.hf_dir, ids, labels)

    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    results = {}
    for name in args.layouts.split(","):
        ctx = initialize_parallel(LAYOUTS[name], model_shape(cfg), seed=1)
        chunks, tconfig = build_glm_model(cfg, ctx.layout)
        load_hf_into_model(chunks, cfg, reader)
        res = {"layout": ctx.layout.describe()}
        logits = forward_logits(chunks, ids)
        if logits is not None:
            res["logits_max_abs_diff"] = float((logits - hf_logits).abs().max())
            res["top1_agreement"] = float((logits.argmax(-1) == hf_logits.argmax(-1)).float().mean())
        ddp = [
            DistributedDataParallel(
                config=tconfig,
                ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                module=c,
            )
            for c in chunks
        ]
        for c in ddp:
            c.zero_grad_buffer()
        loss = forward_backward_lm_loss(ddp, ids, labels)
        finalize_model_grads(ddp)
        if loss is not None:
            res["loss"], res["hf_loss"] = loss, hf_loss
        res["grad_max_rel_err"], res["grad_worst_param"], res["grads_checked"] = grad_errors(
            ddp, cfg, hf_grads
        )
        if name in args.mtp_layouts.split(","):  # "" splits to [""]: no layout
            res.update(check_mtp_and_checkpoint(
                cfg, ctx.layout, os.path.join(args.ckpt_dir, name), reader))
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, res)
        results[name] = gathered
    if dist.get_rank() == 0:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({"hf_loss": hf_loss, "layouts": results}, fh, indent=1)
    destroy_parallel()


if __name__ == "__main__":
    main()
