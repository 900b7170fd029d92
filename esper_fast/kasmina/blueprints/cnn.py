"""Seed blueprints for convolutional hosts: ``[N, C, H, W]`` in, the same shape out.

``norm`` starts as the identity and ``attention`` near it; the convolutional seeds are
residual (``x + f(x)``) from the start, as in the original.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from esper_fast.kasmina.blueprints.registry import BlueprintRegistry


def group_count(channels: int, min_group_size: int = 16) -> int:
    """GroupNorm groups for ``channels``: the most groups (<= 32) dividing ``channels`` that keep
    at least ``min_group_size`` channels each, else the most groups that divide at all."""
    divisors = [g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0]
    for groups in divisors:
        if channels // groups >= min_group_size:
            return groups
    return divisors[0]


class ConvBlock(nn.Module):
    """conv3x3 (no bias) -> BatchNorm -> ReLU: the host's building block."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class SeedConvBlock(nn.Module):
    """conv3x3 -> GroupNorm -> ReLU: seeds use GroupNorm so they carry no running statistics."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(group_count(channels), channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x)))


class NormSeed(nn.Module):
    """``x + tanh(scale) * (GroupNorm(x) - x)``; scale starts at 0 (identity)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(group_count(channels), channels)
        self.scale = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.scale) * (self.norm(x) - x)


class ChannelAttentionSeed(nn.Module):
    """Squeeze-and-excitation: ``x * sigmoid(MLP(mean_hw(x)))``, gate starting near 0.95."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.squeeze = nn.Linear(channels, hidden, bias=False)
        self.excite = nn.Linear(hidden, channels)
        # Input-independent gate at start: sigmoid(3) ~ 0.95, close to the identity.
        nn.init.zeros_(self.excite.weight)
        nn.init.constant_(self.excite.bias, 3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        descriptor = x.mean(dim=(2, 3))
        gate = torch.sigmoid(self.excite(F.relu(self.squeeze(descriptor))))
        return x * gate[:, :, None, None]


class DepthwiseSeed(nn.Module):
    """Residual depthwise-separable conv: ``x + ReLU(GN(pointwise(depthwise(x))))``."""

    def __init__(self, channels: int):
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.norm = nn.GroupNorm(group_count(channels), channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.relu(self.norm(self.pointwise(self.depthwise(x))))


class ConvSeed(nn.Module):
    """Residual stack of ``depth`` conv-GN-ReLU blocks: ``x + body(x)``."""

    def __init__(self, channels: int, depth: int):
        super().__init__()
        self.body = nn.Sequential(*[SeedConvBlock(channels) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


@BlueprintRegistry.register("norm", "cnn", param_estimate=100, description="GroupNorm with a learned mix")
def create_norm_seed(channels: int) -> nn.Module:
    return NormSeed(channels)


@BlueprintRegistry.register("attention", "cnn", param_estimate=2_000, description="squeeze-and-excitation gate")
def create_attention_seed(channels: int, reduction: int = 4) -> nn.Module:
    return ChannelAttentionSeed(channels, reduction)


@BlueprintRegistry.register("depthwise", "cnn", param_estimate=4_800, description="depthwise-separable conv")
def create_depthwise_seed(channels: int) -> nn.Module:
    return DepthwiseSeed(channels)


@BlueprintRegistry.register("conv_light", "cnn", param_estimate=37_000, description="one conv-GN-ReLU block")
def create_conv_light_seed(channels: int) -> nn.Module:
    return ConvSeed(channels, depth=1)


@BlueprintRegistry.register("conv_heavy", "cnn", param_estimate=74_000, description="two conv-GN-ReLU blocks")
def create_conv_heavy_seed(channels: int) -> nn.Module:
    return ConvSeed(channels, depth=2)


__all__ = ["ConvBlock", "SeedConvBlock", "group_count"]
