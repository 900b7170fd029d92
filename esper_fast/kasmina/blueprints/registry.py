"""The blueprint registry: named factories of shape-preserving seed modules per topology.

Keys are ``"<topology>:<name>"``. Registering or removing a blueprint drops the cached
action enum of its topology (:func:`esper_fast.leyline.build_action_enum`), whose layout
follows the registered blueprints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from esper_fast.kasmina import topologies as _topologies

__all__ = ["BlueprintSpec", "BlueprintRegistry", "TOPOLOGIES"]

# The topologies the package's hosts and slots know (their entries: kasmina.topologies).
TOPOLOGIES = tuple(_topologies.TOPOLOGIES)


def _invalidate_action_cache(topology: str | None = None) -> None:
    """Forget the cached action enum of ``topology`` (all of them for None)."""
    try:
        from esper_fast.leyline import actions
    except ImportError:  # during the package's own first import
        return
    if topology is None:
        actions._action_enum_cache.clear()
    else:
        actions._action_enum_cache.pop(topology, None)


@dataclass(frozen=True, slots=True)
class BlueprintSpec:
    """One registered blueprint: ``factory(dim, **kwargs)`` builds the seed module."""

    name: str
    topology: str
    factory: Callable[[int], nn.Module]
    param_estimate: int
    description: str = ""

    def actual_param_count(self, dim: int) -> int:
        """Parameters of a seed built for ``dim`` (builds one)."""
        return sum(p.numel() for p in self.factory(dim).parameters())


class BlueprintRegistry:
    """Registry of seed blueprints (class-level: one registry per process)."""

    _blueprints: dict[str, BlueprintSpec] = {}

    @staticmethod
    def _key(topology: str, name: str) -> str:
        return f"{topology}:{name}"

    @classmethod
    def register(cls, name: str, topology: str, param_estimate: int, description: str = ""):
        """Decorator registering ``factory(dim, **kwargs) -> nn.Module`` as ``topology:name``."""

        def decorator(factory: Callable[[int], nn.Module]):
            cls._blueprints[cls._key(topology, name)] = BlueprintSpec(
                name=name, topology=topology, factory=factory, param_estimate=param_estimate, description=description
            )
            _invalidate_action_cache(topology)
            return factory

        return decorator

    @classmethod
    def list_for_topology(cls, topology: str) -> list[BlueprintSpec]:
        """Every blueprint of ``topology``, smallest parameter estimate first."""
        return sorted((s for s in cls._blueprints.values() if s.topology == topology), key=lambda s: s.param_estimate)

    @classmethod
    def get(cls, topology: str, name: str) -> BlueprintSpec:
        """The spec of ``topology:name``; ValueError naming the choices when there is none."""
        spec = cls._blueprints.get(cls._key(topology, name))
        if spec is None:
            names = [s.name for s in cls.list_for_topology(topology)]
            raise ValueError(f"Unknown blueprint {name!r} for {topology}. Available: {names}")
        return spec

    @classmethod
    def create(cls, topology: str, name: str, dim: int, **kwargs) -> nn.Module:
        """Build seed ``name`` for features of ``dim`` channels (cnn) or width (transformer);
        ``kwargs`` go to the factory (e.g. ``checkpoint=True`` for the transformer mlp)."""
        return cls.get(topology, name).factory(dim, **kwargs)

    @classmethod
    def unregister(cls, topology: str, name: str) -> None:
        """Remove ``topology:name`` if present."""
        cls._blueprints.pop(cls._key(topology, name), None)
        _invalidate_action_cache(topology)

    @classmethod
    def reset(cls) -> None:
        """Remove every blueprint (for tests; re-import the blueprint modules to restore)."""
        cls._blueprints.clear()
        _invalidate_action_cache()

    @classmethod
    def names(cls, topology: str) -> list[str]:
        """The blueprint names of ``topology``, smallest first."""
        return [spec.name for spec in cls.list_for_topology(topology)]
