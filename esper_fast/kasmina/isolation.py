"""The alpha ramp and the two ways a slot joins seed and host features.

``blend_with_isolation`` and ``ste_forward`` are thin names over the fused operators in
:mod:`esper_fast.ops` (one kernel per direction, custom ops that torch.compile traces).
"""

from __future__ import annotations

import math

import torch

from esper_fast import ops


class AlphaSchedule:
    """Sigmoid ramp of the blending weight over ``total_steps`` steps.

    ``start`` at step <= 0, ``end`` at step >= total_steps, and in between
    ``start + (end - start) * sigmoid((step - total_steps / 2) / temperature)``.
    """

    def __init__(self, total_steps: int, start: float = 0.0, end: float = 1.0, temperature: float = 1.0):
        self.total_steps = max(1, int(total_steps))
        self.start = float(start)
        self.end = float(end)
        # A zero temperature would divide by zero; the limit is a step function.
        self.temperature = max(float(temperature), 1e-6)

    def __call__(self, step: int) -> float:
        if step <= 0:
            return self.start
        if step >= self.total_steps:
            return self.end
        scaled = (step - self.total_steps / 2) / self.temperature
        # tanh form of the logistic: no overflow for large |scaled|.
        sigmoid = 0.5 * (1.0 + math.tanh(0.5 * scaled))
        return self.start + (self.end - self.start) * sigmoid

    def __repr__(self) -> str:
        return (
            f"AlphaSchedule(total_steps={self.total_steps}, start={self.start}, "
            f"end={self.end}, temperature={self.temperature})"
        )


def blend_with_isolation(
    host_features: torch.Tensor,
    seed_features: torch.Tensor,
    alpha,
    detach_host: bool = True,
) -> torch.Tensor:
    """``lerp(host, seed, alpha)``; the host path gets no gradient when ``detach_host``.

    ``alpha`` is a float or a tensor broadcastable over the batch dimension, clamped to [0, 1].
    """
    return ops.blend(host_features, seed_features, alpha, detach_host)


def ste_forward(host_features: torch.Tensor, seed_features: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator: the value is ``host_features`` exactly; the incoming
    gradient goes unchanged to both the host path and the seed output."""
    return ops.ste(host_features, seed_features)


__all__ = ["AlphaSchedule", "blend_with_isolation", "ste_forward"]
