"""Configurations of a model's seed slots, and the walk that measures many in one forward.

A **configuration** maps slot ids to the alpha their slot is forced to: a float (0.0 switches
the seed off) or a per-sample tensor ``[B]``; a slot it does not name (or names with None)
runs as it is. :func:`forced_alphas` applies one around an ordinary forward;
:func:`forward_each_configuration` runs one forward per configuration (what the walk must
equal, and its fallback); :func:`forward_tree` is the shared walk (see docs/SLOTS.md).

A **configuration key** says what a configuration makes of the model's output, so that
configurations with equal keys are measured once. Per slot (:func:`slot_key`): :data:`HOST`
when the slot passes the host's features unchanged, ``("float", a)`` for a blend at the
clamped scalar ``a``, ``("tensor", id(alpha))`` for a per-sample alpha. Per model
(:func:`configuration_key`): the tuple of its slots' keys, in host order. Kasmina's walk and
Tolaria's validation both speak in these keys.

The **straight-through rule** (:func:`straight_through`) lives here, once: in TRAINING at a
scalar alpha of 0 a slot's value is the host's features exactly; the seed still runs in a
training forward, for its gradient.
"""

from __future__ import annotations

import contextlib
from typing import Hashable, Mapping, Sequence, Union

import torch
import torch.nn as nn

from esper_fast.kasmina.isolation import blend_with_isolation
from esper_fast.leyline import SeedStage, is_active_stage

__all__ = [
    "HOST",
    "Configuration",
    "SlotKey",
    "ConfigurationKey",
    "straight_through",
    "joins_forward",
    "slot_key",
    "configuration_key",
    "changes_output",
    "forced_alphas",
    "forward_each_configuration",
    "mixes_rows",
    "split_points",
    "forward_slot_groups",
    "forward_tree",
]

# The key of a slot whose output is its input: no seed in the forward, or straight-through.
HOST = "host"
Alpha = Union[float, torch.Tensor, None]
Configuration = Mapping[str, Alpha]
SlotKey = Hashable  # HOST | ("float", a) | ("tensor", id(alpha))
ConfigurationKey = tuple  # one SlotKey per slot, in host order


def per_sample(alpha) -> bool:
    """A per-sample alpha (a tensor of several elements), which always blends."""
    return isinstance(alpha, torch.Tensor) and alpha.numel() > 1


def straight_through(stage: SeedStage, alpha) -> bool:
    """The straight-through rule: in TRAINING at a scalar alpha of 0 the slot's value is the
    host's features exactly (the incoming gradient reaches host and seed alike)."""
    return stage == SeedStage.TRAINING and not per_sample(alpha) and alpha == 0.0


def joins_forward(slot) -> bool:
    """Whether the slot's seed takes part in its forward: a seed in TRAINING..FOSSILIZED."""
    return slot.is_active and is_active_stage(slot.state.stage)


def slot_key(slot, alpha: Alpha = None) -> SlotKey:
    """What ``slot``'s output is under ``alpha`` (None: its current alpha): equal keys mean
    bit-identical outputs for the same input (see the module docstring)."""
    if alpha is None:
        alpha = slot.alpha
    if not joins_forward(slot):
        return HOST
    if isinstance(alpha, torch.Tensor):
        return ("tensor", id(alpha))
    if straight_through(slot.state.stage, alpha):
        return HOST
    return ("float", max(0.0, min(1.0, alpha)))


def configuration_key(slots: Mapping[str, nn.Module], configuration: Configuration) -> ConfigurationKey:
    """The key of ``configuration`` over ``slots`` (slot id -> SeedSlot, host order)."""
    return tuple(slot_key(slot, configuration.get(slot_id)) for slot_id, slot in slots.items())


def changes_output(slot, alpha: Alpha) -> bool:
    """Whether forcing ``slot`` to ``alpha`` changes its output (``alpha=0.0``: whether its
    seed contributes anything to switch off)."""
    return slot_key(slot, alpha) != slot_key(slot, None)


@contextlib.contextmanager
def forced_alphas(slots: Mapping[str, nn.Module], configuration: Configuration):
    """Within the block, each slot that ``configuration`` names (slot id -> alpha; None: as
    it is) runs at that alpha (``slots[slot_id].force_alpha``); every alpha comes back on
    exit, even on error."""
    with contextlib.ExitStack() as forced:
        for slot_id, alpha in configuration.items():
            if alpha is not None:
                forced.enter_context(slots[slot_id].force_alpha(alpha))
        yield


def forward_each_configuration(model: nn.Module, x: torch.Tensor, slots: Mapping[str, nn.Module],
                               configurations) -> list[torch.Tensor]:
    """One ordinary forward of ``model`` per configuration, inside its slots' ``force_alpha``
    (:func:`forced_alphas`): what the shared walk must equal, and its fallback."""
    outputs = []
    for configuration in configurations:
        with forced_alphas(slots, configuration):
            outputs.append(model(x))
    return outputs


def mixes_rows(module: nn.Module) -> bool:
    """True when ``module``'s output for one sample can depend on the other samples of the
    batch: any module in training mode (batch statistics, random masks), and a BatchNorm
    that normalises with batch statistics in eval too (``track_running_stats=False``)."""
    if module.training:
        return True
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is None


def split_points(slots: Mapping[str, nn.Module], configurations: Sequence[Configuration]) -> list[str]:
    """The slots the walk stops at, in host order: those some configuration sets to a
    different output than the current one, and a straight-through slot (whose forward
    would run its seed for an unchanged value)."""
    split = []
    for slot_id, slot in slots.items():
        as_is = slot_key(slot)
        varies = any(slot_key(slot, c.get(slot_id)) != as_is for c in configurations)
        if varies or (as_is == HOST and joins_forward(slot)):
            split.append(slot_id)
    return split


def forward_slot_groups(slot, features: torch.Tensor, num_groups: int, requests) -> list[torch.Tensor]:
    """``slot``'s outputs for several inputs stacked along the batch (eval, no grad).

    ``features`` holds ``num_groups`` inputs of B rows each (``[num_groups * B, ...]``);
    each request ``(group, alpha)`` asks for the output on rows ``group * B ..`` under
    ``alpha`` (None: the current alpha), as the slot's forward gives it inside
    ``force_alpha(alpha)``. The seed runs once, on the stacked inputs of the groups that
    need it (a view when they are contiguous); a request whose :func:`slot_key` is
    :data:`HOST` gets a view of its input rows. Returns one tensor of B rows per request.
    """
    batch = features.shape[0] // num_groups if num_groups else 0
    keys = [slot_key(slot, alpha) for _, alpha in requests]
    needs_seed = sorted({group for (group, _), key in zip(requests, keys) if key != HOST})
    seed_rows: dict[int, torch.Tensor] = {}
    if needs_seed:
        first, last = needs_seed[0], needs_seed[-1]
        if last - first + 1 == len(needs_seed):  # contiguous groups: a view, no copy
            seed_input = features[first * batch : (last + 1) * batch]
        else:
            seed_input = torch.cat([features[g * batch : (g + 1) * batch] for g in needs_seed])
        seed_output = slot._seed_features(seed_input)
        for i, group in enumerate(needs_seed):
            seed_rows[group] = seed_output[i * batch : (i + 1) * batch]
    outputs = []
    for (group, alpha), key in zip(requests, keys):
        host_rows = features[group * batch : (group + 1) * batch]
        if key == HOST:
            outputs.append(host_rows)
        else:
            alpha = slot.alpha if alpha is None else alpha
            outputs.append(blend_with_isolation(host_rows, seed_rows[group], alpha, detach_host=slot._detaches_host()))
    return outputs


def _segment(host: nn.Module, h: torch.Tensor, from_slot: str | None, to_slot: str | None) -> torch.Tensor:
    if from_slot is None:
        return host.forward_to_slot(h, to_slot)
    if to_slot is None:
        return host.forward_from_slot(h, from_slot)
    return host.forward_between(h, from_slot, to_slot)


def forward_tree(host: nn.Module, x: torch.Tensor, slots: Mapping[str, nn.Module],
                 configurations: Sequence[Configuration], split: Sequence[str]):
    """The shared walk over ``host`` (a :class:`~esper_fast.kasmina.protocol.SegmentedHost`),
    stopping at the ``split`` slots: ``(outputs [G * B, ...], group of each configuration, B)``.
    Each segment runs once on every distinct configuration of the slots above it."""
    batch = x.shape[0]
    if not split:
        return host(x), [0] * len(configurations), batch
    h, groups, num_groups, previous = x, [0] * len(configurations), 1, None
    for slot_id in split:
        slot = slots[slot_id]
        h = _segment(host, h, previous, slot_id)
        index: dict = {}
        requests: list = []
        keys: list = []
        for k, configuration in enumerate(configurations):
            alpha = configuration.get(slot_id)
            key = slot_key(slot, alpha)
            if (groups[k], key) not in index:
                index[(groups[k], key)] = len(requests)
                requests.append((groups[k], alpha))
                keys.append(key)
            groups[k] = index[(groups[k], key)]
        unchanged = all(key == HOST for key in keys) and [g for g, _ in requests] == list(range(num_groups))
        if not unchanged:
            outputs = forward_slot_groups(slot, h, num_groups, requests)
            h = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        num_groups, previous = len(requests), slot_id
    return _segment(host, h, previous, None), groups, batch
