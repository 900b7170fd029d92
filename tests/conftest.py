"""Devices, markers and the dtype -> tolerance table shared by every test."""

import pytest
import torch

CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not CUDA:
            item.add_marker(skip_cuda)


# Every device a kernel test runs on; the CUDA case is marked so `pytest -m cuda` selects it.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)


@pytest.fixture
def device_reads(monkeypatch):
    """The validation reads: one entry (the number of accumulators read together) per
    ``MetricsAccumulator.compute_all``; a per-accumulator ``compute`` fails the test."""
    from esper_fast.ops import MetricsAccumulator

    reads = []
    original = MetricsAccumulator.compute_all

    def counting(accumulators):
        reads.append(len(accumulators))
        return original(accumulators)

    monkeypatch.setattr(MetricsAccumulator, "compute_all", staticmethod(counting))
    monkeypatch.setattr(MetricsAccumulator, "compute", lambda self: pytest.fail("per-accumulator read"))
    return reads
