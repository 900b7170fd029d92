"""The alpha ramp, the two ways a slot joins seed and host features, and a monitor of
gradient isolation between them.

``blend_with_isolation`` and ``ste_forward`` are thin names over the fused operators in
:mod:`esper_fast.ops` (one kernel per direction, custom ops that torch.compile traces); their
values and gradients are those of ``torch.lerp`` and of ``host + (seed - seed.detach())``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

import esper_fast.ops as ops

__all__ = ["AlphaSchedule", "blend_with_isolation", "ste_forward", "GradientIsolationMonitor"]


class AlphaSchedule:
    """Sigmoid ramp of the blending weight over ``total_steps`` steps.

    ``start`` at step <= 0, ``end`` at step >= total_steps, and in between
    ``start + (end - start) * sigmoid((step - total_steps / 2) / temperature)``.
    """

    def __init__(self, total_steps: int, start: float = 0.0, end: float = 1.0, temperature: float = 1.0):
        self.total_steps = max(1, total_steps)
        self.start = start
        self.end = end
        # A zero temperature would divide by zero; the limit is a step function.
        self.temperature = max(temperature, 1e-6)

    def __call__(self, step: int) -> float:
        if step <= 0:
            return self.start
        if step >= self.total_steps:
            return self.end
        scaled = (step - self.total_steps / 2) / self.temperature
        # The logistic in its tanh form: no overflow for large |scaled|.
        sigmoid = 0.5 * (1.0 + math.tanh(scaled * 0.5))
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
    """``lerp(host, seed, clamp(alpha, 0, 1))``; the host path gets no gradient when ``detach_host``.

    ``alpha`` is a float or a tensor broadcastable over the batch dimension.
    """
    return ops.blend(host_features, seed_features, alpha, detach_host)


def ste_forward(host_features: torch.Tensor, seed_features: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator: the value is ``host_features``; the incoming gradient goes
    unchanged to both the host path and the seed output."""
    return ops.ste(host_features, seed_features)


def _global_norm(grads: list[torch.Tensor]) -> float:
    # One read for the whole group: the norms are computed by one foreach call.
    if not grads:
        return 0.0
    return torch.stack(torch._foreach_norm(grads)).pow(2).sum().sqrt().item()


class GradientIsolationMonitor:
    """Checks, after a backward, that no gradient reached the host through the seed branch.

    ``register(host, seed)`` records both parameter sets; ``check_isolation()`` measures the
    gradient norm of each (one read per group) and counts a violation when the host's norm is
    at least ``threshold``.
    """

    def __init__(self, threshold: float = 1e-6):
        self.threshold = threshold
        self.host_grad_norm: float = 0.0
        self.seed_grad_norm: float = 0.0
        self.violations: int = 0
        self._host_params: list[nn.Parameter] = []
        self._seed_params: list[nn.Parameter] = []

    def register(self, host: nn.Module, seed: nn.Module) -> None:
        """Watch the trainable parameters of ``host`` and ``seed``."""
        self._host_params = [p for p in host.parameters() if p.requires_grad]
        self._seed_params = [p for p in seed.parameters() if p.requires_grad]

    def watch_seed(self, seed: nn.Module) -> None:
        """Watch ``seed`` in place of the seed registered before (the host stays watched).

        A slot inside the host puts the old seed's parameters among the host's too: the new
        seed's take their place there, so both lists are what ``register`` of the new seed
        would have made."""
        new = [p for p in seed.parameters() if p.requires_grad]
        old = {id(p) for p in self._seed_params}
        host, at = [], None
        for p in self._host_params:
            if id(p) in old:
                at = len(host) if at is None else at
            else:
                host.append(p)
        if at is not None:
            host[at:at] = new
        self._host_params = host
        self._seed_params = new

    @torch.no_grad()
    def check_isolation(self) -> tuple[bool, dict]:
        """``(isolated, details)``; details has both norms, their ratio, the verdict and the
        violation count so far."""
        host_norm = _global_norm([p.grad for p in self._host_params if p.grad is not None])
        seed_norm = _global_norm([p.grad for p in self._seed_params if p.grad is not None])
        self.host_grad_norm = host_norm
        self.seed_grad_norm = seed_norm
        isolated = host_norm < self.threshold
        if not isolated:
            self.violations += 1
        ratio = seed_norm / (host_norm + 1e-8) if host_norm > 0 else 0.0
        return isolated, {
            "host_grad_norm": host_norm,
            "seed_grad_norm": seed_norm,
            "seed_gradient_ratio": ratio,
            "isolated": isolated,
            "violations": self.violations,
        }

    def reset(self) -> None:
        """Forget the violations and the registered parameters."""
        self.violations = 0
        self.host_grad_norm = 0.0
        self.seed_grad_norm = 0.0
        self._host_params.clear()
        self._seed_params.clear()
