"""glm_megatron: SFT, reward-model and PPO post-training of GLM-4.x MoE models on Megatron-Core.

Importing the package is cheap on purpose: Megatron-Core is imported only by the subpackages
that need it (``parallel``, ``models``, ``engine``, ``generation``, ``algorithms``). The house
and its rules: docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"
