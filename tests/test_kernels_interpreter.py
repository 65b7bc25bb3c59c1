"""The Triton kernels, run by Triton's CPU interpreter in a fresh process, match the references.

TRITON_INTERPRET must be set before triton decorates the kernels, so the checks run in a
subprocess (tests/kernels_helpers/triton_checks.py); each check is reported as its own test.
tests/test_kernels_cuda.py runs the same checks natively where a GPU is present.
"""

import pytest

from tests.kernels_helpers.triton_runs import CHECKS, run_triton_checks


@pytest.fixture(scope="module")
def results():
    return run_triton_checks("cpu")


@pytest.mark.parametrize("name", CHECKS["cpu"])
def test_interpreted_kernel(results, name):
    assert name in results, f"check {name!r} did not run; ran: {sorted(results)}"
    ok, detail = results[name]
    assert ok, f"{name}: {detail}"


def test_no_unlisted_checks(results):
    assert sorted(results) == sorted(CHECKS["cpu"])
