"""The controller's discrete action space.

Per topology, ``build_action_enum`` lays out WAIT, one GERMINATE_<BLUEPRINT> per registered
blueprint (smallest first), FOSSILIZE and CULL. ``Action`` is the fixed CNN layout.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["Action", "SimicAction", "build_action_enum", "get_blueprint_from_action", "is_germinate_action"]

_GERMINATE_PREFIX = "GERMINATE_"

# topology -> its enum; the blueprint registry clears an entry when the topology's blueprints change.
_action_enum_cache: dict[str, type[IntEnum]] = {}


def build_action_enum(topology: str) -> type[IntEnum]:
    """The action enum of ``topology`` (built once, then cached): 0 WAIT, 1..N germinate the
    registered blueprints in order of parameter estimate, N+1 FOSSILIZE, N+2 CULL."""
    cached = _action_enum_cache.get(topology)
    if cached is not None:
        return cached
    from esper_fast.kasmina.blueprints import BlueprintRegistry

    specs = BlueprintRegistry.list_for_topology(topology)
    members = {"WAIT": 0}
    members.update({f"{_GERMINATE_PREFIX}{spec.name.upper()}": i for i, spec in enumerate(specs, start=1)})
    members["FOSSILIZE"] = len(specs) + 1
    members["CULL"] = len(specs) + 2
    enum = IntEnum(f"{topology.title()}Action", members)
    _action_enum_cache[topology] = enum
    return enum


def get_blueprint_from_action(action: IntEnum) -> str | None:
    """The blueprint a germinate action plants (lower case), None for any other action."""
    if not action.name.startswith(_GERMINATE_PREFIX):
        return None
    return action.name[len(_GERMINATE_PREFIX):].lower()


def is_germinate_action(action: IntEnum) -> bool:
    """True for every GERMINATE_* action."""
    return action.name.startswith(_GERMINATE_PREFIX)


class Action(IntEnum):
    """The fixed CNN action layout (blueprints in order of parameter estimate)."""

    WAIT = 0
    GERMINATE_NORM = 1
    GERMINATE_ATTENTION = 2
    GERMINATE_DEPTHWISE = 3
    GERMINATE_CONV_LIGHT = 4
    GERMINATE_CONV_HEAVY = 5
    FOSSILIZE = 6
    CULL = 7

    @classmethod
    def is_germinate(cls, action: "Action") -> bool:
        """True for the five GERMINATE_* members."""
        return action in _LEGACY_BLUEPRINTS

    @classmethod
    def get_blueprint_id(cls, action: "Action") -> str | None:
        """The blueprint a germinate action plants, None for any other action."""
        return _LEGACY_BLUEPRINTS.get(action)


_LEGACY_BLUEPRINTS = {
    Action.GERMINATE_NORM: "norm",
    Action.GERMINATE_ATTENTION: "attention",
    Action.GERMINATE_DEPTHWISE: "depthwise",
    Action.GERMINATE_CONV_LIGHT: "conv_light",
    Action.GERMINATE_CONV_HEAVY: "conv_heavy",
}

SimicAction = Action  # the former name
