"""DPO's pieces without a process group: the three losses and TRL's metrics against numbers
worked out by hand, the gradient reaching the policy only, next-token targets and micro-batch
layout of the pairs, and every config check naming its key."""

import math

import numpy as np
import pytest
import torch

from glm_megatron.algorithms.dpo.config import DPOConfig
from glm_megatron.algorithms.dpo.data import DPOBatcher, next_token_targets
from glm_megatron.algorithms.dpo.loss import (
    REPORT_KEYS,
    DPOLoss,
    pair_report,
    preference_losses,
    report_means,
    sequence_logps,
)
from glm_megatron.engine.config import TrainConfigError, load_config

# Two pairs, [chosen 0, chosen 1, rejected 0, rejected 1]: log-ratios policy - reference are
# chosen (+1, -1), rejected (-1, +1), so h = (+2, -2); response lengths 5, 4 | 10, 2.
POLICY = torch.tensor([-10.0, -12.0, -20.0, -15.0])
REFERENCE = torch.tensor([-11.0, -11.0, -19.0, -16.0])
TOKENS = torch.tensor([5.0, 4.0, 10.0, 2.0])


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_sigmoid_dpo_by_hand():
    got = preference_losses(POLICY, REFERENCE, TOKENS, DPOLoss("sigmoid", beta=0.1))
    # -log sigmoid(x) = log(1 + exp(-x)), x = beta * h = +0.2, -0.2
    assert got.tolist() == pytest.approx([softplus(-0.2), softplus(0.2)], abs=1e-6)


def test_conservative_dpo_by_hand():
    got = preference_losses(POLICY, REFERENCE, TOKENS, DPOLoss("conservative", 0.1, 0.25))
    want = [0.75 * softplus(-0.2) + 0.25 * softplus(0.2), 0.75 * softplus(0.2) + 0.25 * softplus(-0.2)]
    assert got.tolist() == pytest.approx(want, abs=1e-6)


def test_ipo_uses_per_token_averages_by_hand():
    got = preference_losses(POLICY, REFERENCE, TOKENS, DPOLoss("ipo", beta=0.5))
    # h_avg = +1/5 - (-1)/10 = 0.3 and -1/4 - (+1)/2 = -0.75; target 1 / (2 * 0.5) = 1.
    assert got.tolist() == pytest.approx([(0.3 - 1.0) ** 2, (-0.75 - 1.0) ** 2], abs=1e-6)
    # Summed log-ratios (no averaging) would give (2 - 1)^2 and (-2 - 1)^2 instead.
    assert got.tolist() != pytest.approx([1.0, 9.0], abs=1e-3)


def test_the_gradient_reaches_the_policy_only_with_dpos_weights():
    policy = POLICY.clone().requires_grad_(True)
    reference = REFERENCE.clone().requires_grad_(True)
    preference_losses(policy, reference.detach(), TOKENS, DPOLoss("sigmoid", 0.1)).sum().backward()
    # d/d pi_c [-log sigmoid(beta h)] = -beta sigmoid(-beta h); the rejected side gets the opposite.
    s0, s1 = 1 / (1 + math.exp(0.2)), 1 / (1 + math.exp(-0.2))
    assert policy.grad.tolist() == pytest.approx([-0.1 * s0, -0.1 * s1, 0.1 * s0, 0.1 * s1], abs=1e-6)
    assert reference.grad is None


def test_trl_metrics_and_filler_pairs():
    hp = DPOLoss("sigmoid", 0.1)
    losses = preference_losses(POLICY, REFERENCE, TOKENS, hp)
    sums = pair_report(POLICY, REFERENCE, losses, torch.tensor([1.0, 0.0]), hp.beta)
    assert len(sums) == len(REPORT_KEYS)
    means = report_means(sums, "eval_")
    # Only pair 0 counts: rewards beta * log-ratio = +0.1 (chosen), -0.1 (rejected).
    assert means == pytest.approx({
        "eval_loss": softplus(-0.2), "eval_rewards/chosen": 0.1, "eval_rewards/rejected": -0.1,
        "eval_rewards/accuracies": 1.0, "eval_rewards/margins": 0.2,
        "eval_logps/chosen": -10.0, "eval_logps/rejected": -20.0}, abs=1e-6)
    both = report_means(pair_report(POLICY, REFERENCE, losses, torch.ones(2), hp.beta))
    assert both["rewards/accuracies"] == 0.5 and both["rewards/margins"] == pytest.approx(0.0)
    # A tie is not a correct ranking (TRL: chosen_rewards > rejected_rewards).
    tie = report_means(pair_report(REFERENCE, REFERENCE, losses, torch.ones(2), hp.beta))
    assert tie["rewards/accuracies"] == 0.0


def test_next_token_targets_and_response_sums():
    tokens = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    labels, mask = next_token_targets(tokens, [np.array([0, 1, 1]), np.array([0, 1])], pad_id=0)
    assert labels.tolist() == [[6, 7, 0, 0], [9, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]
    token_logps = torch.tensor([[-1.0, -2.0, -4.0, -8.0], [-0.5, -3.0, -9.0, -9.0]])
    assert sequence_logps(token_logps, mask).tolist() == [-3.0, -0.5]


class Pairs(list):
    def lengths(self):
        return np.array([max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in self])


def _row(chosen, chosen_mask, rejected, rejected_mask):
    a = lambda x, t: np.asarray(x, dtype=t)  # noqa: E731
    return {"chosen_input_ids": a(chosen, np.int64), "chosen_loss_mask": a(chosen_mask, np.uint8),
            "rejected_input_ids": a(rejected, np.int64),
            "rejected_loss_mask": a(rejected_mask, np.uint8), "margin": a([np.nan], np.float32)}


def test_a_micro_batch_holds_the_chosen_rows_then_the_rejected_rows_of_the_same_pairs():
    data = Pairs([_row([1, 2, 3], [0, 0, 1], [1, 2, 4, 5], [0, 0, 1, 1]),
                  _row([1, 7, 8, 9, 2], [0, 0, 1, 1, 1], [1, 7, 6], [0, 0, 1])])
    b = DPOBatcher(data, pad_id=0, pad_multiple=2, device="cpu")
    assert b.step_length(np.arange(2)) == 6  # the longest row (5) rounded up to the multiple
    mb = b.microbatch(np.array([1, 0]), 6, mask_rows=np.array([False, True]))
    assert mb["tokens"].tolist() == [[1, 7, 8, 9, 2, 0], [1, 2, 3, 0, 0, 0],
                                     [1, 7, 6, 0, 0, 0], [1, 2, 4, 5, 0, 0]]
    assert mb["labels"][0].tolist() == [7, 8, 9, 2, 0, 0]
    assert mb["mask"].tolist() == [[0, 1, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0],
                                   [0, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0]]
    assert mb["rows"].tolist() == [1, 0] and mb["weight"].tolist() == [1.0, 0.0]


def _config(tmp_path, overrides):
    path = tmp_path / "dpo.yaml"
    path.write_text("model: {preset: glm4-moe-tiny}\ncheckpoint: {checkpoint_interval: 100}\n")
    return load_config(str(path), overrides, schema=DPOConfig)


def test_defaults_are_trls(tmp_path):
    cfg = _config(tmp_path, [])
    t = cfg.training
    assert (t.loss_type, t.beta, t.label_smoothing) == ("sigmoid", 0.1, 0.0)
    assert not t.precompute_ref_log_probs and t.reference_model is None
    assert cfg.checkpoint.output_dir == "output/dpo"
    assert cfg.evaluation.metric_for_best_model == "eval_loss"


@pytest.mark.parametrize("overrides,message", [
    (["training.loss_type=hinge"], "training.loss_type: 'hinge' is not one of 'sigmoid', 'ipo', "
                                   "'conservative'"),
    (["training.beta=0"], "training.beta must be > 0"),
    (["training.loss_type=conservative"], "training.label_smoothing must be in (0, 0.5) for "
                                          "loss_type conservative"),
    (["training.loss_type=conservative", "training.label_smoothing=0.5"],
     "training.label_smoothing must be in (0, 0.5)"),
    (["training.label_smoothing=0.1"], "training.label_smoothing applies to loss_type "
                                       "conservative only"),
    (["training.loss_type=ipo", "training.label_smoothing=0.1"], "(loss_type is ipo)"),
    (["training.packing=true"], "training.packing: the DPO trainer pads"),
    (["model.build_mtp=true"], "model.build_mtp: DPO scores responses with the main LM head"),
    (["model.use_peft=true", "training.reference_model=/x"], "training.reference_model: with "
                                                             "model.use_peft the reference is"),
    (["model.use_peft=true", "training.offload_reference=true"], "training.offload_reference: "
                                                                 "nothing to offload, with model"),
    (["training.precompute_ref_log_probs=true", "training.offload_reference=true"],
     "training.offload_reference: nothing to offload, with training.precompute_ref_log_probs"),
    (["parallel.context_parallel_size=2"], "parallel.context_parallel_size: the DPO trainer"),
    (["training.margin=0.5"], "unknown key training.margin"),
    (["evaluation.metric_for_best_model=rewards/accuracies"], "must name an eval metric"),
])
def test_a_bad_config_names_its_key(tmp_path, overrides, message):
    with pytest.raises(TrainConfigError) as err:
        _config(tmp_path, overrides)
    assert message in str(err.value)


@pytest.mark.parametrize("name,world,preset,pairs", [
    ("glm46_355b_dpo.yaml", 512, "glm4.6-355b-a32b", 128),
    ("glm45_air_dpo.yaml", 128, "glm4.5-air-106b-a12b", 128),
    ("tiny_dpo/dpo.yaml", 2, "glm4-moe-tiny", 16),
])
def test_example_configs_load_and_their_layouts_fit(name, world, preset, pairs):
    from pathlib import Path

    from glm_megatron.engine.batching import resolve_batch
    from glm_megatron.models import get_preset
    from glm_megatron.models.config import model_shape
    from glm_megatron.parallel import validate_layout

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "examples" / name), schema=DPOConfig)
    layout = validate_layout(cfg.parallel, world, model_shape(get_preset(preset)), training=True,
                             cuda=True, have_transformer_engine=True)
    assert resolve_batch(cfg.training, layout.data_parallel_size(world)).global_batch_size == pairs
    assert cfg.training.loss_type == "sigmoid" and cfg.evaluation.eval_at_start
