"""The compiled extension is the one in use: no silent fallback to Python."""

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import esper_fast

DECLARED_OPS = sorted(
    name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("esper_fast::")
)
# The families API.md promises; each must be declared by the extension.
REQUIRED_OPS = {"blend_forward", "blend_backward", "ste_forward"}


def test_extension_is_loaded_from_this_package():
    path = esper_fast.extension_path()
    assert os.path.basename(path).startswith("_C")
    assert os.path.dirname(os.path.realpath(path)) == os.path.dirname(os.path.realpath(esper_fast.__file__))


def test_required_ops_are_declared():
    assert REQUIRED_OPS <= set(DECLARED_OPS)


@pytest.mark.parametrize("op", DECLARED_OPS)
def test_every_op_has_a_cpu_kernel(op):
    assert op in esper_fast.kernels_available()["cpu"]


@pytest.mark.skipif(os.environ.get("ESPER_FAST_REQUIRE_CUDA_BUILD") != "1", reason="CUDA build not required here")
@pytest.mark.parametrize("op", DECLARED_OPS)
def test_ci_build_carries_cuda_kernels(op):
    assert esper_fast._C.cuda_compiled == 1
    assert op in esper_fast.kernels_available()["cuda"]


def test_kernels_available_reports_backends():
    available = esper_fast.kernels_available()
    assert set(available) == {"cpu", "cuda"}
    assert available["cpu"] == DECLARED_OPS
    if esper_fast._C.cuda_compiled:
        assert available["cuda"] == DECLARED_OPS
    else:
        assert available["cuda"] == []


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


def test_public_wrappers_dispatch_to_the_extension():
    host = torch.randn(2, 3, 4, 4, requires_grad=True)
    seed = torch.randn(2, 3, 4, 4, requires_grad=True)
    with _RecordOps() as recorded:
        (esper_fast.ops.blend(host, seed, 0.3, detach_host=False).sum() + esper_fast.ops.ste(host, seed).sum()).backward()
    assert {"esper_fast::blend_forward", "esper_fast::blend_backward", "esper_fast::ste_forward"} <= recorded.names
