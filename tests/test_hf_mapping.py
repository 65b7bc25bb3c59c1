"""The HF <-> Megatron tensor mapping, checked against layouts written out by hand."""

import pytest
import torch

from glm_megatron.models import get_preset
from glm_megatron.models.hf_mapping import (
    Source,
    combine,
    global_name,
    hf_sources,
    read_shard,
    shard,
    split,
)

CFG = get_preset("glm4-moe-tiny")  # 4 heads, 2 KV groups, head_dim 16


class DictReader:
    def __init__(self, tensors):
        self.tensors = tensors
        self.sliced = []

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def read(self, name):
        return self.tensors[name]

    def read_slice(self, name, dim, start, stop):
        self.sliced.append(name)
        return self.tensors[name].narrow(dim, start, stop - start)


def test_qkv_is_interleaved_per_kv_group():
    hd, h = CFG.head_dim, CFG.hidden_size
    q = torch.arange(4 * hd).float()[:, None].expand(-1, h)
    k = 1000 + torch.arange(2 * hd).float()[:, None].expand(-1, h)
    v = 2000 + torch.arange(2 * hd).float()[:, None].expand(-1, h)
    fused = combine(Source("qkv", ("q", "k", "v")), [q, k, v], CFG)[:, 0]
    # Group 0: q heads 0-1, k head 0, v head 0; then group 1.
    expected = torch.cat([q[: 2 * hd, 0], k[:hd, 0], v[:hd, 0], q[2 * hd :, 0], k[hd:, 0], v[hd:, 0]])
    assert torch.equal(fused, expected)
    assert all(torch.equal(a, b) for a, b in zip(split(Source("qkv", ("q", "k", "v")), fused[:, None], CFG),
                                                  [q[:, :1], k[:, :1], v[:, :1]]))


@pytest.mark.parametrize("name, dim", [
    ("decoder.layers.0.self_attention.linear_qkv.weight", 0),
    ("decoder.layers.0.self_attention.linear_qkv.bias", 0),
    ("decoder.layers.0.mlp.linear_fc1.weight", 0),
    ("decoder.layers.0.mlp.linear_fc2.weight", 1),
    ("decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight", 0),
    ("decoder.layers.0.self_attention.linear_proj.weight", 1),
    ("output_layer.weight", 0),
])
@pytest.mark.parametrize("size", [1, 2])
def test_slice_reads_equal_slicing_the_full_tensor(name, dim, size):
    source = hf_sources(name, CFG)
    gen = torch.Generator().manual_seed(0)
    shapes = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64)}
    tensors = {}
    for n in source.hf_names:
        leaf = n.split(".")[-2]
        shape = shapes.get(leaf, (CFG.intermediate_size, CFG.hidden_size))
        if "experts" in n:
            shape = (CFG.moe_intermediate_size, CFG.hidden_size)
        if n.endswith("bias"):
            shape = shape[:1]
        if leaf in ("down_proj", "o_proj"):
            shape = (CFG.hidden_size, shape[0] if leaf == "down_proj" else 64)
        if leaf == "lm_head":
            shape = (CFG.vocab_size, CFG.hidden_size)
        tensors[n] = torch.randn(shape, generator=gen)
    full = combine(source, [tensors[n] for n in source.hf_names], CFG)
    reader = DictReader(tensors)
    for rank in range(size):
        expected = shard(full, source, dim, rank, size)
        assert torch.equal(read_shard(source, CFG, reader, dim, rank, size), expected)
    if size > 1:
        assert set(reader.sliced) == set(source.hf_names)  # no full reads for split tensors


def test_global_names_cover_pipeline_expert_and_te_naming():
    assert global_name("decoder.layers.1.mlp.experts.local_experts.2.linear_fc1.weight",
                       layer_offset=2, expert_offset=4) == \
        "decoder.layers.3.mlp.experts.local_experts.6.linear_fc1.weight"
    # MTP experts are offset too (they sit under transformer_layer.).
    assert global_name("mtp.layers.0.transformer_layer.mlp.experts.local_experts.1.linear_fc2.weight",
                       layer_offset=2, expert_offset=4) == \
        "mtp.layers.0.transformer_layer.mlp.experts.local_experts.5.linear_fc2.weight"
    assert global_name("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
                       layer_offset=1, expert_offset=0) == "decoder.layers.1.input_layernorm.weight"
    assert hf_sources("mtp.layers.0.eh_proj.weight", CFG).hf_names == ("model.layers.4.eh_proj.weight",)


DENSE = get_preset("glm4-0414-tiny")  # fused gate_up_proj, sandwich norms


@pytest.mark.parametrize("size", [1, 2])
def test_fused_gate_up_shards_are_gate_rows_then_up_rows(size):
    f, h = DENSE.intermediate_size, DENSE.hidden_size
    source = hf_sources("decoder.layers.1.mlp.linear_fc1.weight", DENSE)
    assert source == Source("gate_up", ("model.layers.1.mlp.gate_up_proj.weight",))
    gate_up = torch.randn(2 * f, h, generator=torch.Generator().manual_seed(1))
    gate, up = gate_up[:f], gate_up[f:]
    reader = DictReader({source.hf_names[0]: gate_up})
    full = combine(source, [gate_up], DENSE)
    step = f // size
    for rank in range(size):
        # Megatron's fc1 on a TP rank: that rank's gate rows, then its up rows (not a slice of
        # the concatenation).
        expected = torch.cat([gate[rank * step:(rank + 1) * step], up[rank * step:(rank + 1) * step]])
        assert torch.equal(read_shard(source, DENSE, reader, 0, rank, size), expected)
        assert torch.equal(shard(full, source, 0, rank, size), expected)
    assert torch.equal(split(source, full, DENSE)[0], gate_up)


def test_sandwich_norms_keep_their_hf_names():
    for norm in ("post_self_attn_layernorm", "post_mlp_layernorm"):
        assert hf_sources(f"decoder.layers.2.{norm}.weight", DENSE) == \
            Source("copy", (f"model.layers.2.{norm}.weight",))
