"""glm_megatron: post-training of GLM-4.x MoE models on Megatron-Core."""
from setuptools import find_packages, setup

setup(
    name="glm_megatron",
    version="0.1.0",
    description="SFT, reward-model and PPO post-training of GLM-4.x MoE models on Megatron-Core",
    python_requires=">=3.10",
    # The kernels' source lives in kernels/glm_kernels/ and is the package `glm_kernels`: a
    # top-level package named `kernels` would shadow Hugging Face's `kernels` (which transformers
    # imports when it is installed) whenever the checkout is on sys.path.
    packages=[*find_packages(include=["glm_megatron", "glm_megatron.*"]), "glm_kernels"],
    package_dir={"glm_kernels": "kernels/glm_kernels"},
    install_requires=[
        # torch is deliberately unpinned beyond a floor so a cluster's CUDA build is kept; on a
        # CPU machine `make install` installs the CPU wheel torch==2.13.0 *first*, so this
        # requirement is already satisfied and pip never reaches for CUDA wheels.
        "torch>=2.6",
        "megatron-core==0.16.1",
        "triton",
        "transformers>=4.56",
        "safetensors",
        "sentencepiece",
        "tokenizers",
        "tensorboard",
        "pyyaml",
        "psutil",
        "tqdm",
        "einops",
        "packaging",
        "numpy",
        "numba",  # single-pass CPU GAE kernel (kernels/glm_kernels/gae_numba.py), CPU default of compute_gae
        "jinja2",
        "matplotlib",  # reward-model calibration plots (imported lazily, Agg backend)
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]"],
        # Hugging Face's `kernels` is installed so tests/test_kernels_package.py can show it and our
        # glm_kernels side by side in one process (it needs no torch of its own).
        # peft is the oracle of the LoRA tests (our adapter files are peft's format; the
        # library writes and reads them without importing peft).
        "test": ["pytest", "pytest-timeout", "ruff", "kernels", "peft==0.21.2"],
    },
    entry_points={"console_scripts": ["glm-megatron=glm_megatron.__main__:main"]},
)
