"""The Triton kernels match the references: on CPU under Triton's interpreter (always), and
compiled for a GPU where a CUDA device is present (skipped elsewhere, e.g. this project's CI).

TRITON_INTERPRET must be set before triton decorates the kernels, so the checks run in a fresh
process per device (tests/kernels_helpers/triton_checks.py); each check is reported as its own test.
"""

import pytest
import torch

from tests.kernels_helpers.triton_runs import CHECKS, run_triton_checks

_NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
_results = {}


def _cases(with_name: bool):
    for device in CHECKS:
        marks = [_NO_GPU] if device == "cuda" else []
        for name in CHECKS[device] if with_name else [None]:
            yield pytest.param(device, name, marks=marks, id=device if name is None else f"{device}: {name}")


def _results_for(device: str) -> dict:
    if device not in _results:  # one subprocess runs all of a device's checks
        _results[device] = run_triton_checks(device)
    return _results[device]


@pytest.mark.parametrize("device,name", _cases(with_name=True))
def test_triton_kernel(device, name):
    results = _results_for(device)
    assert name in results, f"check {name!r} did not run; ran: {sorted(results)}"
    ok, detail = results[name]
    assert ok, f"{name}: {detail}"


@pytest.mark.parametrize("device,name", _cases(with_name=False))
def test_no_unlisted_checks(device, name):
    assert sorted(_results_for(device)) == sorted(CHECKS[device])
