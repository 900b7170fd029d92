"""The compiled extension is the one in use: no silent fallback to Python."""

import os

import pytest
import torch

import esper_fast

OPS = ["blend_forward", "blend_backward", "ste_forward"]


def test_extension_is_loaded_from_this_package():
    path = esper_fast.extension_path()
    assert os.path.basename(path).startswith("_C")
    assert os.path.dirname(os.path.realpath(path)) == os.path.dirname(os.path.realpath(esper_fast.__file__))


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_cpu_kernel(op):
    assert op in esper_fast.kernels_available()["cpu"]


@pytest.mark.skipif(os.environ.get("ESPER_FAST_REQUIRE_CUDA_BUILD") != "1", reason="CUDA build not required here")
@pytest.mark.parametrize("op", OPS)
def test_ci_build_carries_cuda_kernels(op):
    assert esper_fast._C.cuda_compiled == 1
    assert op in esper_fast.kernels_available()["cuda"]


def test_kernels_available_reports_backends():
    available = esper_fast.kernels_available()
    assert set(available) == {"cpu", "cuda"}
    if esper_fast._C.cuda_compiled:
        assert available["cuda"], "a CUDA build must register CUDA kernels"
    else:
        assert available["cuda"] == []
    assert all(isinstance(name, str) for name in available["cpu"])
    assert torch.ops.esper_fast is not None
