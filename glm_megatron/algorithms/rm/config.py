"""Reward-model configuration: the SFT schema plus the seed's ``loss_type: ranking`` and ``margin``.

Everything else (``model.freeze_encoder_layers``, ``model.freeze_embeddings``, batch keys,
checkpoints, evaluation, ``parallel:``) means what it means for SFT. ``per_device_train_batch_size``
counts preference *pairs*: a micro-batch of B pairs is one ``[2B, T]`` forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...engine.config import (
    CheckpointSection,
    EvaluationSection,
    TrainConfigError,
    TrainerConfig,
    TrainingSection,
    choice,
    validate_common,
)


@dataclass
class RMTrainingSection(TrainingSection):
    loss_type: str = choice("ranking", "ranking")
    # Bradley-Terry with margin: -log sigmoid(r_chosen - r_rejected - margin). A per-pair margin
    # stored with the data (a ``margin`` field of the tokenized rows) takes precedence.
    margin: float = 0.0
    # Pairs (chosen and rejected both scored) used for the reward normalisation statistics
    # saved with each checkpoint: the validation data, else the training data.
    reward_stats_samples: int = 1024


@dataclass
class RMCheckpointSection(CheckpointSection):
    output_dir: str = "output/rm"


@dataclass
class RMEvaluationSection(EvaluationSection):
    metric_for_best_model: str = "eval_accuracy"


@dataclass
class RMConfig(TrainerConfig):
    training: RMTrainingSection = field(default_factory=RMTrainingSection)
    checkpoint: RMCheckpointSection = field(default_factory=RMCheckpointSection)
    evaluation: RMEvaluationSection = field(default_factory=RMEvaluationSection)

    def validate(self) -> None:
        validate_common(self)
        t = self.training
        if t.packing:
            raise TrainConfigError("training.packing: not supported by the reward-model trainer "
                                   "(pairs are padded; set training.packing: false)")
        if t.reward_stats_samples < 1:
            raise TrainConfigError("training.reward_stats_samples must be >= 1")
        if self.model.build_mtp:
            raise TrainConfigError("model.build_mtp: a reward model has no next-token loss for the "
                                   "MTP layer; set model.build_mtp: false")
