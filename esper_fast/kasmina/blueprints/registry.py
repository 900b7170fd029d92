"""The blueprint registry: named factories of shape-preserving seed modules per topology."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

TOPOLOGIES = ("cnn", "transformer")


@dataclass(frozen=True)
class BlueprintSpec:
    """One registered blueprint: ``factory(dim, **kwargs)`` builds the seed module."""

    name: str
    topology: str
    factory: Callable[..., nn.Module]
    param_estimate: int
    description: str = ""

    def actual_param_count(self, dim: int) -> int:
        return sum(p.numel() for p in self.factory(dim).parameters())


class BlueprintRegistry:
    """Registry of seed blueprints, keyed by ``(topology, name)``."""

    _blueprints: dict[tuple[str, str], BlueprintSpec] = {}

    @classmethod
    def register(cls, name: str, topology: str, param_estimate: int, description: str = ""):
        """Decorator registering ``factory(dim, **kwargs) -> nn.Module`` under ``(topology, name)``."""
        if topology not in TOPOLOGIES:
            raise ValueError(f"unknown topology {topology!r}; choose one of {list(TOPOLOGIES)}")

        def decorator(factory):
            cls._blueprints[(topology, name)] = BlueprintSpec(name, topology, factory, param_estimate, description)
            return factory

        return decorator

    @classmethod
    def unregister(cls, topology: str, name: str) -> None:
        cls._blueprints.pop((topology, name), None)

    @classmethod
    def list_for_topology(cls, topology: str) -> list[BlueprintSpec]:
        """Every blueprint of ``topology``, smallest first."""
        if topology not in TOPOLOGIES:
            raise ValueError(f"unknown topology {topology!r}; choose one of {list(TOPOLOGIES)}")
        specs = [spec for (topo, _), spec in cls._blueprints.items() if topo == topology]
        return sorted(specs, key=lambda spec: spec.param_estimate)

    @classmethod
    def names(cls, topology: str) -> list[str]:
        return [spec.name for spec in cls.list_for_topology(topology)]

    @classmethod
    def get(cls, topology: str, name: str) -> BlueprintSpec:
        spec = cls._blueprints.get((topology, name))
        if spec is None:
            raise ValueError(
                f"unknown blueprint {name!r} for topology {topology!r}; choose one of {cls.names(topology)}"
            )
        return spec

    @classmethod
    def create(cls, topology: str, name: str, dim: int, **kwargs) -> nn.Module:
        """Build the seed module ``name`` for features of ``dim`` channels (cnn) or width (transformer)."""
        return cls.get(topology, name).factory(dim, **kwargs)


__all__ = ["BlueprintSpec", "BlueprintRegistry", "TOPOLOGIES"]
