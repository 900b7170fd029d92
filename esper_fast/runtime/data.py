"""Offline data for the task presets: loaders over a dataset the caller passes, or over the
package's generated, learnable stand-ins (:mod:`esper_fast.data`). Nothing here downloads."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from esper_fast import data


def synthetic_images(num_samples: int, seed: int = 0) -> Dataset:
    """The generated 10-class 3x32x32 image set (see :func:`esper_fast.data.synthetic_images`),
    normalised like CIFAR-10, the same for the same ``seed``."""
    return data.ImageBatches(*data.synthetic_images(num_samples, seed=seed))


def synthetic_tokens(num_samples: int, block_size: int, seed: int = 0) -> Dataset:
    """``num_samples`` next-token windows ``(x, y)`` of ``block_size`` byte tokens (ids < 256)
    from the generated story corpus, the same for the same ``seed``."""
    stories = max(1, num_samples * (block_size + 1) // 150 + 1)  # a story is about 180 bytes
    tokens = data.encode_bytes(data.synthetic_stories(stories, seed=seed))
    blocks = data.TokenBlocks(tokens, block_size)
    return torch.utils.data.Subset(blocks, range(min(num_samples, len(blocks))))


def make_dataloaders(
    trainset: Dataset,
    testset: Dataset,
    batch_size: int,
    num_workers: int = 0,
    shuffle: bool = True,
    seed: int = 0,
    pin_memory: bool = False,
) -> tuple[DataLoader, DataLoader]:
    """(train loader, test loader); the train order is shuffled reproducibly from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    trainloader = DataLoader(
        trainset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
        pin_memory=pin_memory, generator=generator,
    )
    testloader = DataLoader(testset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin_memory)
    return trainloader, testloader


__all__ = ["synthetic_images", "synthetic_tokens", "make_dataloaders"]
