"""The topologies seeds grow in, one entry each: every fact about a topology lives here.

A :class:`Topology` says how its hosts name their injection points, which blueprints its
seeds come from (and the run default), how a seed's shape is probed at germination and in
which stages the blend keeps the host's gradient. The hosts, the slot, the blueprint
registry and the app read these entries; a new topology is a new entry (and its host and
blueprints).

    from esper_fast.kasmina.topologies import topology
    topology("cnn").slot_ids(3)             # ('block2_post', 'block3_post')
    topology("transformer").blueprints()    # ['norm', 'lora', ...], smallest first
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from esper_fast.leyline import SeedStage

__all__ = ["Topology", "TOPOLOGIES", "DEFAULT_TOPOLOGY", "topology", "topology_of", "slots_in_host_order"]

# What a slot without a task_config is (the original's rule).
DEFAULT_TOPOLOGY = "cnn"


@dataclass(frozen=True)
class Topology:
    """One topology's facts.

    ``slot_id(i)``: the id of the injection point after the host's block/layer ``i``
    (0-based); ``first_slot_block``: the first block with a slot after it (a CNN has none
    after its first block); ``injection_points``: those points in words, for messages.
    ``default_blueprint``: the blueprint a run grows by default. ``probe_shape(width)``: the
    shape of the random input that checks a new seed preserves the features' shape.
    ``host_gradient_stages``: the stages in which the blend keeps the host path's gradient
    (elsewhere the host path is detached).
    """

    name: str
    slot_id: Callable[[int], str]
    first_slot_block: int
    injection_points: str
    default_blueprint: str
    probe_shape: Callable[[int], tuple[int, ...]]
    host_gradient_stages: frozenset = frozenset()

    def slot_ids(self, blocks: int) -> tuple[str, ...]:
        """The injection points of a host of ``blocks`` blocks (layers), in the host's order."""
        return tuple(self.slot_id(i) for i in range(self.first_slot_block, blocks))

    def blueprints(self) -> list[str]:
        """The registered blueprints of this topology, smallest first."""
        from esper_fast.kasmina.blueprints import BlueprintRegistry

        return BlueprintRegistry.names(self.name)


# Shape probes a seed must preserve at germination (any H/W or sequence length will do).
CNN_SHAPE_PROBE_SPATIAL = 8
TRANSFORMER_SHAPE_PROBE_SEQ_LEN = 4

_ENTRIES = (
    Topology(
        name="cnn",
        slot_id=lambda i: f"block{i + 1}_post",
        first_slot_block=1,
        injection_points="CNNHost's injection points, after every block but the first",
        default_blueprint="conv_light",
        probe_shape=lambda width: (1, width, CNN_SHAPE_PROBE_SPATIAL, CNN_SHAPE_PROBE_SPATIAL),
    ),
    Topology(
        name="transformer",
        slot_id=lambda i: f"layer_{i}_post_block",
        first_slot_block=0,
        injection_points="the transformer's injection points layer_{i}_post_block, after each layer",
        default_blueprint="lora",
        probe_shape=lambda width: (2, TRANSFORMER_SHAPE_PROBE_SEQ_LEN, width),
        host_gradient_stages=frozenset(
            {SeedStage.BLENDING, SeedStage.SHADOWING, SeedStage.PROBATIONARY, SeedStage.FOSSILIZED}
        ),
    ),
)

# name -> entry, in the order the package lists topologies.
TOPOLOGIES: dict[str, Topology] = {entry.name: entry for entry in _ENTRIES}


def topology(name: str) -> Topology:
    """The entry of ``name``; ValueError naming the choices for an unknown one."""
    entry = TOPOLOGIES.get(name)
    if entry is None:
        raise ValueError(f"Unknown topology {name!r}. Available: {list(TOPOLOGIES)}")
    return entry


def topology_of(task_config) -> str:
    """The topology named by ``task_config.topology`` (:data:`DEFAULT_TOPOLOGY` without one)."""
    return task_config.topology if task_config is not None else DEFAULT_TOPOLOGY


def slots_in_host_order(slots, injection_points) -> list[str]:
    """``slots`` (a slot id, several, or None) as a list in the host's order of
    ``injection_points`` ([] for None); ValueError for an unknown, repeated or empty choice.
    The rule :class:`~esper_fast.kasmina.host.MorphogeneticModel` applies to its ``slots``."""
    if slots is None:
        return []
    if isinstance(slots, str):
        slots = [slots]
    requested = list(slots)
    if not requested:
        raise ValueError("slots must name at least one injection point")
    unknown = [s for s in requested if s not in injection_points]
    if unknown:
        raise ValueError(f"Slots {unknown} not found in host injection points: {list(injection_points)}")
    if len(set(requested)) != len(requested):
        raise ValueError(f"slots names an injection point twice: {requested}")
    return [s for s in injection_points if s in requested]
