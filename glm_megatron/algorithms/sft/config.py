"""SFT configuration: the engine's :class:`TrainerConfig` as it is (the seed's
``configs/training_sft.yaml`` keys), with the checks every trainer gets."""

from __future__ import annotations

from ...engine.config import TrainerConfig


class SFTConfig(TrainerConfig):
    """Loss on assistant tokens; ``training.packing`` packs several conversations per row."""
