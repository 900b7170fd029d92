"""Seed blueprints for convolutional hosts, ``[N, C, H, W]`` in and the same shape out, and
the conv blocks the host and the seeds are built from.

Parameter names, shapes and initialisation (PyTorch's defaults, in construction order) are
the original's, so a checkpoint moves between the two and a seed starts with the same
weights for the same torch seed.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from esper_fast.kasmina.blueprints.registry import BlueprintRegistry

__all__ = ["ConvBlock", "SeedConvBlock", "get_num_groups"]

_GROUP_CHOICES = (32, 16, 8, 4, 2, 1)


def get_num_groups(channels: int, target_group_size: int = 16) -> int:
    """GroupNorm groups for ``channels``: the most groups (<= 32) that divide ``channels`` and
    keep at least ``target_group_size`` channels each, else the most that divide at all."""
    divisors = [g for g in _GROUP_CHOICES if channels % g == 0]
    for groups in divisors:
        if channels // groups >= target_group_size:
            return groups
    return divisors[0] if divisors else 1


class ConvBlock(nn.Module):
    """conv (no bias, same padding) -> BatchNorm -> ReLU: the host's building block.

    ``track_running_stats=False`` makes BatchNorm use batch statistics in eval too (no
    running buffers), for sharded training.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, track_running_stats: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, track_running_stats=track_running_stats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class SeedConvBlock(nn.Module):
    """conv -> GroupNorm -> ReLU: seeds use GroupNorm so they carry no running statistics."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.gn = nn.GroupNorm(get_num_groups(out_channels), out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.gn(self.conv(x)))


class NormSeed(nn.Module):
    """``x + scale * (GroupNorm(x) - x)`` with ``scale`` starting at 1 (the normalised features)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups=min(32, channels), num_channels=channels)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * (self.norm(x) - x)


class AttentionSeed(nn.Module):
    """Squeeze-and-excitation channel gate: ``x * sigmoid(fc(avgpool(x)))``."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        reduced = max(1, channels // reduction)
        self.fc = nn.Sequential(
            nn.Linear(channels, reduced, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(reduced, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = x.size()
        gate = self.fc(self.avg_pool(x).reshape(b, c)).reshape(b, c, 1, 1)
        return x * gate.expand_as(x)


class DepthwiseSeed(nn.Module):
    """Residual depthwise-separable conv: ``x + ReLU(GN(pointwise(depthwise(x))))``."""

    def __init__(self, channels: int):
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, kernel_size=3, padding=1, groups=channels, bias=False)
        self.pointwise = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.gn = nn.GroupNorm(get_num_groups(channels), channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.relu(self.gn(self.pointwise(self.depthwise(x))))


class ConvLightSeed(nn.Module):
    """Residual single conv block: ``x + enhance(x)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.enhance = SeedConvBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.enhance(x)


class ConvHeavySeed(nn.Module):
    """Residual pair of conv blocks: ``x + enhance(x)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.enhance = nn.Sequential(SeedConvBlock(channels, channels), SeedConvBlock(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.enhance(x)


@BlueprintRegistry.register("norm", "cnn", param_estimate=100, description="GroupNorm enhancement")
def create_norm_seed(channels: int) -> nn.Module:
    return NormSeed(channels)


@BlueprintRegistry.register("attention", "cnn", param_estimate=2000, description="SE-style channel attention")
def create_attention_seed(channels: int, reduction: int = 4) -> nn.Module:
    return AttentionSeed(channels, reduction)


@BlueprintRegistry.register("depthwise", "cnn", param_estimate=4800, description="Depthwise-separable conv")
def create_depthwise_seed(channels: int) -> nn.Module:
    return DepthwiseSeed(channels)


@BlueprintRegistry.register("conv_light", "cnn", param_estimate=37000, description="Light conv block")
def create_conv_light_seed(channels: int) -> nn.Module:
    return ConvLightSeed(channels)


@BlueprintRegistry.register("conv_heavy", "cnn", param_estimate=74000, description="Heavy conv block")
def create_conv_heavy_seed(channels: int) -> nn.Module:
    return ConvHeavySeed(channels)
