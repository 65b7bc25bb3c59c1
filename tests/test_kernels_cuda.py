"""The Triton kernels compiled for a GPU match the references: the interpreter's checks, natively.

Skipped where no CUDA device is present (this project's CI machine); there
tests/test_kernels_interpreter.py runs the same kernels under Triton's interpreter.
"""

import pytest
import torch

from tests.kernels_helpers.triton_runs import CHECKS, run_triton_checks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def results():
    return run_triton_checks("cuda")


@pytest.mark.parametrize("name", CHECKS["cuda"])
def test_native_kernel(results, name):
    assert name in results, f"check {name!r} did not run; ran: {sorted(results)}"
    ok, detail = results[name]
    assert ok, f"{name}: {detail}"


def test_no_unlisted_checks(results):
    assert sorted(results) == sorted(CHECKS["cuda"])
