"""SFT batches: only assistant tokens (and their terminator) carry loss; packing stays exact."""

import numpy as np
import pytest
import torch
from workers.train_common import build_tiny_data

from glm_megatron.algorithms.sft.data import SFTBatcher
from glm_megatron.data.tokenizer import load_tokenizer
from glm_megatron.engine.batching import Truncated, open_tokenized


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_tiny_data(str(tmp_path_factory.mktemp("mask_data")), n_train=64, n_val=8, n_test=2)


def _masked_lm_loss(mask, per_token):
    # Imported lazily: training.sft pulls in Megatron.
    from glm_megatron.algorithms.sft.loss import masked_lm_loss

    return masked_lm_loss(mask, per_token)


@pytest.mark.parametrize("packing", [False, True])
def test_only_assistant_tokens_are_supervised(data, packing):
    tok = load_tokenizer(data["tokenizer"])
    ds = Truncated(open_tokenized(data["train"], "data", "sft", 512), 65)
    batcher = SFTBatcher(ds, 64, tok.pad_id, 1, -100, packing, "cpu")
    rows = np.arange(4)
    batch = batcher.microbatch(rows, 64 if packing else batcher.step_length(rows))
    for b in range(4):
        mask = batch["loss_mask"][b].bool()
        supervised = tok.decode(batch["labels"][b][mask].tolist())
        context = tok.decode(batch["tokens"][b].tolist())
        # Targets are the answers, the empty think block and the <|endoftext|> terminator;
        # never the system prompt, the user's request or the role tokens of the prompt.
        assert "transform digit strings" in context and "transform" not in supervised
        assert not any(task in supervised for task in ("reverse:", "sort:", "repeat:"))
        assert "<|user|>" not in supervised and "<|system|>" not in supervised
        assert "<|assistant|>" not in supervised
        assert supervised.count("<|endoftext|>") >= 1
        assert "</think>" in supervised
        # Every unsupervised position has a label the model can take (Megatron's CE).
        assert int(batch["labels"][b].min()) >= 0


def test_loss_ignores_unsupervised_positions():
    per_token = torch.tensor([[5.0, 1.0, 2.0, 7.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    total, count, report = _masked_lm_loss(mask, per_token)
    assert float(total) == 3.0 and int(count) == 2
    assert report["lm loss"].tolist() == [3.0, 2.0]
    per_token[0, 0] = per_token[0, 3] = 1e6  # user/system positions: no effect
    assert float(_masked_lm_loss(mask, per_token)[0]) == 3.0


def test_packing_raises_the_real_token_fraction(data):
    ds = Truncated(open_tokenized(data["train"], "data", "sft", 512), 65)
    padded = SFTBatcher(ds, 64, 0, 1, -100, False, "cpu")
    packed = SFTBatcher(ds, 256, 0, 1, -100, True, "cpu")
    rows = np.arange(len(padded))
    real = padded.real_tokens(rows)
    # Padding to the longest row of a batch of 8 vs. packing into rows of 256 positions.
    padded_total = sum(padded.step_length(rows[i:i + 8]) * len(rows[i:i + 8])
                       for i in range(0, len(rows), 8))
    packed_rows = np.arange(len(packed))
    assert packed.real_tokens(packed_rows) == real  # nothing lost or duplicated
    assert real / (len(packed) * 256) > real / padded_total
