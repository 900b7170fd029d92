"""The fused operators, callable directly. Each family: a thin wrapper over
``torch.ops.esper_fast.*`` with its autograd and fake (meta) registrations.
Pure-PyTorch references live in :mod:`esper_fast.ops.reference`.
"""

from esper_fast.ops import reference
from esper_fast.ops.blend import blend, ste
from esper_fast.ops.metrics import MetricsAccumulator, MetricsResult, StackedMetricsAccumulator
from esper_fast.ops.mode import reference_mode, using_reference
from esper_fast.ops.snapshot import HostSnapshot

__all__ = [
    "blend",
    "ste",
    "MetricsAccumulator",
    "MetricsResult",
    "StackedMetricsAccumulator",
    "HostSnapshot",
    "reference",
    "reference_mode",
    "using_reference",
]
