"""Whether a blueprint's seed can train on a device, asked before a run depends on it.

Some seeds run forward everywhere but have no backward on some devices (FlexAttention has
none on CPU): a run would start, germinate and fail epochs later. A probe on a small input
of the topology's shape finds it at once.
"""

from __future__ import annotations

import torch

from esper_fast.kasmina.blueprints.registry import BlueprintRegistry
from esper_fast.kasmina.topologies import topology

# Narrow enough to be quick, wide enough for every blueprint's grouping (heads, norm groups).
PROBE_WIDTH = 32


def training_failure(topology_name: str, blueprint: str, device: torch.device | str) -> str | None:
    """Why a seed of ``blueprint`` cannot train on ``device`` (its forward and backward on a
    probe input fail), in one line; None when it trains. The probe draws from forked random
    generators, so the caller's random state is left as it was."""
    device = torch.device(device)
    shape = topology(topology_name).probe_shape(PROBE_WIDTH)
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        try:
            seed = BlueprintRegistry.create(topology_name, blueprint, PROBE_WIDTH).to(device)
            probe = torch.randn(shape, device=device, requires_grad=True)
            seed(probe).sum().backward()
        except Exception as exc:  # any failure means the run could not train this seed
            first = (str(exc).strip().splitlines() or [""])[0].split(". ")[0].rstrip(".")
            return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return None
