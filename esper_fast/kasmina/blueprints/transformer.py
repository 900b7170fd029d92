"""Seed blueprints for transformer hosts, ``[B, T, D]`` in and the same shape out.

Every seed is residual; the attention, flex_attention, mlp and lora seeds zero their output
projection, so they start as the identity. Parameter names, shapes and initialisation are the
original's. The ``attention`` seed attends over the whole sequence (no causal mask), as in
the original; ``flex_attention`` (registered when torch has FlexAttention) is causal.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from esper_fast.kasmina.blueprints.registry import BlueprintRegistry

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    _HAS_FLEX_ATTENTION = True
except ImportError:  # torch < 2.5
    _HAS_FLEX_ATTENTION = False

__all__: list[str] = []


class TransformerNormSeed(nn.Module):
    """``x + scale * (LayerNorm(x) - x)`` with ``scale`` starting at 1."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * (self.norm(x) - x)


class LoRASeed(nn.Module):
    """Low-rank residual adapter ``x + up(down(x))``; ``up`` starts at zero."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.down(x))


def _split_heads(qkv: torch.Tensor, n_head: int, head_dim: int):
    """``[B, T, 3D]`` -> q, k, v of ``[B, heads, T, head_dim]`` (views of one permute)."""
    b, t, _ = qkv.shape
    qkv = qkv.reshape(b, t, 3, n_head, head_dim).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


class TransformerAttentionSeed(nn.Module):
    """An extra self-attention branch ``x + proj(SDPA(q, k, v))`` over the whole sequence."""

    def __init__(self, dim: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.head_dim = dim // n_head
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = _split_heads(self.qkv(x), self.n_head, self.head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(1, 2).reshape(b, t, c))


class TransformerMLPSeed(nn.Module):
    """An extra feed-forward branch ``x + fc2(gelu(fc1(x)))``; ``fc2`` starts at zero. With
    ``use_checkpoint`` the branch is recomputed in backward (training with grad only)."""

    def __init__(self, dim: int, expansion: int, use_checkpoint: bool):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim * expansion)
        self.fc2 = nn.Linear(dim * expansion, dim)
        self.use_checkpoint = use_checkpoint
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and x.requires_grad:
            return x + torch_checkpoint(self._mlp_forward, x, use_reentrant=False)
        return x + self._mlp_forward(x)


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


class FlexAttentionSeed(TransformerAttentionSeed):
    """A causal FlexAttention branch ``x + proj(flex_attention(q, k, v))`` (the attention
    seed's layers); block masks are cached per (sequence length, device, dtype), at most
    ``_MAX_CACHE_SIZE`` of them."""

    _MAX_CACHE_SIZE = 8
    _keeps_tensors_across_calls = True  # the mask cache: validation must not make inference tensors

    def __init__(self, dim: int, n_head: int):
        super().__init__(dim, n_head)
        self._block_mask_cache: dict[tuple[int, str, str], object] = {}

    def _get_causal_block_mask(self, seq_len: int, device: torch.device, dtype: torch.dtype):
        key = (seq_len, str(device), str(dtype))
        mask = self._block_mask_cache.get(key)
        if mask is None:
            if len(self._block_mask_cache) >= self._MAX_CACHE_SIZE:
                del self._block_mask_cache[next(iter(self._block_mask_cache))]  # oldest first
            mask = create_block_mask(_causal, B=None, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=device)
            self._block_mask_cache[key] = mask
        return mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = _split_heads(self.qkv(x), self.n_head, self.head_dim)
        out = flex_attention(q, k, v, block_mask=self._get_causal_block_mask(t, x.device, x.dtype))
        return x + self.proj(out.transpose(1, 2).reshape(b, t, c))


@BlueprintRegistry.register("norm", "transformer", param_estimate=800, description="LayerNorm only")
def create_transformer_norm_seed(dim: int) -> nn.Module:
    return TransformerNormSeed(dim)


@BlueprintRegistry.register("lora", "transformer", param_estimate=6000, description="Low-rank adapter (rank=8)")
def create_lora_seed(dim: int, rank: int = 8) -> nn.Module:
    return LoRASeed(dim, rank)


@BlueprintRegistry.register(
    "attention", "transformer", param_estimate=50000, description="Additional self-attention head"
)
def create_transformer_attention_seed(dim: int, n_head: int = 4) -> nn.Module:
    return TransformerAttentionSeed(dim, n_head)


@BlueprintRegistry.register("mlp", "transformer", param_estimate=1200000, description="Additional MLP (4x expansion)")
def create_transformer_mlp_seed(dim: int, expansion: int = 4, checkpoint: bool = False) -> nn.Module:
    return TransformerMLPSeed(dim, expansion, checkpoint)


if _HAS_FLEX_ATTENTION:

    @BlueprintRegistry.register(
        "flex_attention", "transformer", param_estimate=55000,
        description="FlexAttention with causal mask (PyTorch 2.5+)",
    )
    def create_flex_attention_seed(dim: int, n_head: int = 4) -> nn.Module:
        return FlexAttentionSeed(dim, n_head)
