"""The CPU support for Megatron-Core is installed by entry points only, and leaves other torch
calls alone.

Everything runs in one fresh subprocess without CUDA (``CUDA_VISIBLE_DEVICES=""``), so this test
process's torch stays untouched and the check holds on a GPU machine too.
"""

import json
import subprocess
import sys

import pytest

from helpers.launch import REPO, free_port
from helpers.launch import test_env as launch_env

SCRIPT = r"""
import json, os, sys

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0")
import torch

from glm_megatron.models import get_preset
from glm_megatron.parallel import (
    CpuSupportError, ParallelLayout, cpu_support_installed, destroy_parallel, initialize_parallel,
    install_cpu_support,
)

out = {"cuda": torch.cuda.is_available()}


def refused(fn):
    try:
        fn()
    except CpuSupportError as err:
        return str(err)
    return None


out["init_refused"] = refused(lambda: initialize_parallel(ParallelLayout()))
from glm_megatron.models.summary import summarize

out["summary_refused"] = refused(lambda: summarize(get_preset("glm4-moe-tiny"), ParallelLayout()))
out["installed_before"] = cpu_support_installed()
out["install"] = [install_cpu_support(), install_cpu_support()]  # idempotent

# Python calls into the compatibility layer while plain torch code runs (an HF-style forward).
COMPAT = os.path.join("glm_megatron", "parallel", "cpu_compat.py")
calls = []


def profiler(frame, event, arg):
    if event == "call" and frame.f_code.co_filename.endswith(COMPAT):
        calls.append(frame.f_code.co_name)


layer = torch.nn.Linear(8, 8)
x = torch.randn(4, 8)
sys.setprofile(profiler)
y = torch.softmax(layer(x) @ x.t() + 1.0, dim=-1).sum(dim=0).float()
y.norm().item()
sys.setprofile(None)
out["plain_torch_calls"] = len(calls)
sys.setprofile(profiler)
torch.zeros(2)  # a wrapped factory: the counter does see the layer
sys.setprofile(None)
out["factory_calls"] = len(calls)
out["mode_stack"] = torch._C._len_torch_function_stack()

out["cuda_factory"] = str(torch.zeros(2, device="cuda").device)
out["cuda_to"] = str(torch.ones(1).to("cuda").device)
out["cuda_method"] = str(torch.ones(1).cuda().device)
out["type_here"] = torch.ones(1).type()
namespace = {"__name__": "megatron.core.optimizer.fake"}
exec("def name(t):\n    return t.type()\n", namespace)
out["type_megatron"] = namespace["name"](torch.ones(1))
with torch.device("meta"):
    out["meta"] = str(torch.zeros(2).device)

ctx = initialize_parallel(ParallelLayout(), seed=1)
out["backend"] = ctx.backend
destroy_parallel()
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def result():
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(free_port())], cwd=REPO,
                          env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_megatron_entry_points_refuse_without_cpu_support(result):
    assert not result["cuda"] and not result["installed_before"]
    for key, caller in (("init_refused", "initialize_parallel"), ("summary_refused", "summarize()")):
        message = result[key]
        assert message is not None, f"{caller} ran without the CPU support"
        assert message.startswith(caller) and "install_cpu_support()" in message
        assert "entry point" in message


def test_installed_support_runs_megatron_and_is_idempotent(result):
    assert result["install"] == [True, True]
    assert result["backend"] == "gloo"
    assert result["cuda_factory"] == result["cuda_to"] == result["cuda_method"] == "cpu"
    assert result["meta"] == "meta"  # torch's device context still sees the wrapped factories
    # Megatron's optimizer sees CUDA type names; everyone else the true name.
    assert result["type_megatron"] == "torch.cuda.FloatTensor"
    assert result["type_here"] == "torch.FloatTensor"


def test_plain_torch_calls_are_not_intercepted(result):
    assert result["mode_stack"] == 0  # no process-wide torch function mode
    assert result["plain_torch_calls"] == 0
    assert result["factory_calls"] >= 1
