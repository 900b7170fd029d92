"""Offline data for the tasks: loaders over a dataset the caller passes, or over a small
deterministic synthetic dataset. Nothing here downloads."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset


def synthetic_images(num_samples: int, num_classes: int = 10, image_size: int = 32, seed: int = 0) -> TensorDataset:
    """``num_samples`` random ``[3, image_size, image_size]`` float images with random labels,
    the same for the same ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(num_samples, 3, image_size, image_size, generator=generator)
    labels = torch.randint(0, num_classes, (num_samples,), generator=generator)
    return TensorDataset(images, labels)


def synthetic_tokens(num_samples: int, vocab_size: int, block_size: int, seed: int = 0) -> TensorDataset:
    """``num_samples`` random token sequences as next-token pairs ``(x[:-1], x[1:])`` of
    length ``block_size``, the same for the same ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (num_samples, block_size + 1), generator=generator)
    return TensorDataset(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())


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
