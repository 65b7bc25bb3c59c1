"""DPO configuration: the SFT schema plus TRL's DPO keys in ``training:``.

``training.loss_type`` (``sigmoid`` | ``ipo`` | ``conservative``), ``training.beta``,
``training.label_smoothing``, ``training.precompute_ref_log_probs`` are TRL's ``DPOConfig``
names; ``training.reference_model`` names the frozen reference (default: the starting policy's
own weights, whatever loaded them); ``training.offload_reference`` keeps a separate reference
in host memory between its uses, as PPO's ``rlhf.offload_reference``.

Everything else (``model:`` with LoRA, batch keys, checkpoints, evaluation, ``parallel:``) means
what it means for SFT. ``per_device_train_batch_size`` counts preference *pairs*: a micro-batch
of B pairs is one ``[2B, T]`` forward pass, chosen and rejected of a pair always together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...engine.config import (
    CheckpointSection,
    EvaluationSection,
    TrainerConfig,
    TrainingSection,
    choice,
    require,
    validate_common,
)

LOSS_TYPES = ("sigmoid", "ipo", "conservative")


@dataclass
class DPOTrainingSection(TrainingSection):
    # sigmoid: -log sigmoid(beta * h); conservative: the same with labels flipped with
    # probability label_smoothing; ipo: (h_avg - 1 / (2 beta))^2 on per-token averages (TRL).
    loss_type: str = choice("sigmoid", *LOSS_TYPES)
    beta: float = 0.1
    label_smoothing: float = 0.0
    reference_model: str | None = None  # a checkpoint; None: the starting policy's weights
    precompute_ref_log_probs: bool = False  # score every pair once before training
    offload_reference: bool = False


@dataclass
class DPOCheckpointSection(CheckpointSection):
    output_dir: str = "output/dpo"


@dataclass
class DPOEvaluationSection(EvaluationSection):
    # The held-out DPO loss keeps separating checkpoints after eval_rewards/accuracies saturates
    # at 1.0, and it is what TRL's Trainer ranks checkpoints by unless told otherwise.
    metric_for_best_model: str = "eval_loss"


@dataclass
class DPOConfig(TrainerConfig):
    training: DPOTrainingSection = field(default_factory=DPOTrainingSection)
    checkpoint: DPOCheckpointSection = field(default_factory=DPOCheckpointSection)
    evaluation: DPOEvaluationSection = field(default_factory=DPOEvaluationSection)

    def validate(self) -> None:
        validate_common(self)
        t, m = self.training, self.model
        require(t.beta > 0, f"training.beta must be > 0, got {t.beta}")
        if t.loss_type == "conservative":
            require(0 < t.label_smoothing < 0.5,
                    f"training.label_smoothing must be in (0, 0.5) for loss_type conservative "
                    f"(the probability that a preference label is flipped), got {t.label_smoothing}")
        else:
            require(t.label_smoothing == 0,
                    f"training.label_smoothing applies to loss_type conservative only (sigmoid DPO "
                    f"with label smoothing is conservative DPO): set training.loss_type: "
                    f"conservative or training.label_smoothing: 0 (loss_type is {t.loss_type})")
        # Pairs are padded rows scored by the next-token log-probs of the main head only.
        require(not t.packing, "training.packing: the DPO trainer pads each pair's rows; set "
                               "training.packing: false")
        require(not m.build_mtp, "model.build_mtp: DPO scores responses with the main LM head, "
                                 "the MTP layer would get no gradient; set model.build_mtp: false")
        require(not (m.use_peft and t.reference_model),
                "training.reference_model: with model.use_peft the reference is the base model "
                "with its adapters off (one copy of the weights); remove training.reference_model")
        if t.offload_reference:
            require(not m.use_peft, "training.offload_reference: nothing to offload, with "
                                    "model.use_peft the reference is the policy's own base weights")
            require(not t.precompute_ref_log_probs,
                    "training.offload_reference: nothing to offload, with "
                    "training.precompute_ref_log_probs the reference is freed once it has scored "
                    "the data")
        require(self.parallel.context_parallel_size == 1,
                "parallel.context_parallel_size: the DPO trainer does not split sequences over "
                "context-parallel ranks; use 1")
