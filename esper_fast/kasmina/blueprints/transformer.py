"""Seed blueprints for transformer hosts: ``[B, T, D]`` in, the same shape out.

Each seed is residual with a zero-initialised output projection (or scale), so it starts
as the identity.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from esper_fast.kasmina.blueprints.registry import BlueprintRegistry


class LayerNormSeed(nn.Module):
    """``x + tanh(scale) * (LayerNorm(x) - x)``; scale starts at 0."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.scale = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.scale) * (self.norm(x) - x)


class LoRASeed(nn.Module):
    """Low-rank residual adapter ``x + up(down(x))``; ``up`` starts at zero."""

    def __init__(self, dim: int, rank: int = 8):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.down(x))


class CausalAttentionSeed(nn.Module):
    """An extra causal self-attention branch ``x + proj(SDPA(q, k, v))``; ``proj`` starts at zero."""

    def __init__(self, dim: int, n_head: int = 4):
        super().__init__()
        if dim % n_head != 0:
            raise ValueError(f"attention seed needs dim divisible by n_head, got dim={dim}, n_head={n_head}")
        self.n_head = n_head
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.proj(out.transpose(1, 2).reshape(b, t, c))


class MLPSeed(nn.Module):
    """An extra feed-forward branch ``x + fc2(gelu(fc1(x)))``; ``fc2`` starts at zero."""

    def __init__(self, dim: int, expansion: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim * expansion)
        self.fc2 = nn.Linear(dim * expansion, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(x)))


def _attention_heads(dim: int) -> int:
    """4 heads when they divide ``dim`` (the original's choice), else the largest that does."""
    return next(h for h in (4, 2, 1) if dim % h == 0)


@BlueprintRegistry.register("norm", "transformer", param_estimate=800, description="LayerNorm with a learned mix")
def create_transformer_norm_seed(dim: int) -> nn.Module:
    return LayerNormSeed(dim)


@BlueprintRegistry.register("lora", "transformer", param_estimate=6_000, description="low-rank adapter (rank 8)")
def create_lora_seed(dim: int, rank: int = 8) -> nn.Module:
    return LoRASeed(dim, rank)


@BlueprintRegistry.register("attention", "transformer", param_estimate=50_000, description="extra causal attention")
def create_transformer_attention_seed(dim: int, n_head: int | None = None) -> nn.Module:
    return CausalAttentionSeed(dim, n_head if n_head is not None else _attention_heads(dim))


@BlueprintRegistry.register("mlp", "transformer", param_estimate=1_200_000, description="extra MLP (4x expansion)")
def create_transformer_mlp_seed(dim: int, expansion: int = 4) -> nn.Module:
    return MLPSeed(dim, expansion)


__all__: list[str] = []
