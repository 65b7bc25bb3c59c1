"""Our kernels and Hugging Face's `kernels` package side by side in one process.

Our Triton kernels live in the repository's kernels/ folder as the package `glm_kernels`
(kernels/glm_kernels/); there is no top-level package of ours named `kernels`, which would shadow
Hugging Face's kernel hub (`pip install kernels`, in the `test` extra; transformers imports it when
it is installed) whenever the checkout is on sys.path, as it is for `python -m pytest` from the
repository root. Nothing is installed here: the test extra has put HF's package in the venv.
"""

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import glm_kernels

ROOT = Path(__file__).resolve().parents[1]
OUR_DIR = ROOT / "kernels" / "glm_kernels"
API = ["KL_TYPES", "TokenLogProbs", "compute_gae", "kl_penalty", "logprobs_from_logits", "token_logprobs",
       "whiten_advantages"]


def _hf_kernels():
    if importlib.util.find_spec("kernels") is None:
        pytest.fail("Hugging Face's `kernels` is missing; the test extra has it: pip install -e '.[test]'")
    import kernels

    return kernels


def test_ours_and_hugging_faces_side_by_side():
    hf = _hf_kernels()
    assert Path(glm_kernels.__file__).resolve() == OUR_DIR / "__init__.py"
    assert sorted(glm_kernels.__all__) == sorted(API)
    assert all(callable(getattr(glm_kernels, name)) for name in API if name != "KL_TYPES")
    hf_file = Path(hf.__file__).resolve()
    # Installed, not the checkout's kernels/ folder (the venv itself may live inside the checkout).
    assert "site-packages" in hf_file.parts and ROOT / "kernels" not in hf_file.parents, hf_file
    assert callable(hf.get_kernel)
    assert not hasattr(hf, "token_logprobs")
    assert sys.modules["kernels"] is hf and sys.modules["glm_kernels"] is glm_kernels


def test_no_top_level_kernels_package_in_the_checkout():
    # A kernels/__init__.py would make `import kernels` mean our folder from the repository root.
    assert not (ROOT / "kernels" / "__init__.py").exists()
    code = "import kernels, sys; print(kernels.__file__); print(sys.path[0] == '')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    origin, cwd_first = out.stdout.split()
    assert cwd_first == "True"  # the checkout is on sys.path, first: the case that used to collide
    assert "site-packages" in Path(origin).parts and ROOT / "kernels" not in Path(origin).resolve().parents


def test_transformers_imports_cleanly_with_hf_kernels_installed():
    _hf_kernels()
    import transformers
    from transformers import Glm4MoeConfig
    from transformers.utils import is_kernels_available

    assert isinstance(is_kernels_available(), bool)
    assert Glm4MoeConfig().model_type == "glm4_moe"
    assert transformers.__version__
    if "kernels" in sys.modules:  # if transformers imported it, it got Hugging Face's
        assert ROOT / "kernels" not in Path(sys.modules["kernels"].__file__).resolve().parents


def _kernel_files():
    yield from OUR_DIR.glob("*.py")
    yield from (ROOT / "tests").glob("test_kernels_*.py")
    yield from (ROOT / "tests" / "kernels_helpers").glob("*.py")
    yield from (ROOT / "tools").glob("bench_kernels*.py")


@pytest.mark.parametrize("path", sorted(_kernel_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_names_imported_across_files(path):
    """A module another file imports has a public name, and so does a function it imports."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            bad += [a.name for a in node.names if any(p.startswith("_") for p in a.name.split("."))]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            parts = (node.module or "").split(".")
            bad += [f"{node.module}" for p in parts if p.startswith("_")]
            bad += [f"{node.module}:{a.name}" for a in node.names if a.name.startswith("_")]
    assert not bad, f"{path.relative_to(ROOT)} imports private names: {bad}"
    assert not path.name.startswith("_") or path.name == "__init__.py"
