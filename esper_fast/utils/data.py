"""Dataset loaders for the task presets: CIFAR-10 and TinyStories, each with a ``mock``
mode of random data for offline and test use.

The signatures, defaults and mock data (drawn from torch's global RNG for CIFAR-10, from a
fixed-seed generator for TinyStories) are esper-lite's, so the same torch seed gives the
same batches. Real CIFAR-10 needs torchvision (downloaded into ``data_root`` if absent; a
failed download falls back to the mock data with a warning); real TinyStories needs the
``datasets`` and ``transformers`` packages.
"""

from __future__ import annotations

import warnings

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["load_cifar10", "TinyStoriesDataset", "load_tinystories"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
GPT2_VOCAB_SIZE = 50257


def _mock_cifar10(batch_size: int) -> tuple[DataLoader, DataLoader]:
    """Two batches of N(0, 1) 3x32x32 images with uniform labels for each split."""
    n = batch_size * 2
    trainset = TensorDataset(torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,)))
    testset = TensorDataset(torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,)))
    return (
        DataLoader(trainset, batch_size=batch_size, shuffle=True, num_workers=0),
        DataLoader(testset, batch_size=batch_size, shuffle=False, num_workers=0),
    )


def load_cifar10(
    batch_size: int = 128,
    generator: torch.Generator | None = None,
    data_root: str = "./data",
    num_workers: int = 4,
    mock: bool = False,
) -> tuple[DataLoader, DataLoader]:
    """``(trainloader, testloader)`` of CIFAR-10 (augmented, normalised train split).

    Args:
        batch_size: batch size of both loaders.
        generator: shuffles the train loader reproducibly.
        data_root: where the dataset lives (downloaded there if missing).
        num_workers: loader workers (0 for sandboxes and CI).
        mock: random data instead of CIFAR-10 (two batches per split).
    """
    if mock:
        return _mock_cifar10(batch_size)
    import torchvision
    import torchvision.transforms as transforms

    normalize = transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)
    train_transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize,
    ])
    test_transform = transforms.Compose([transforms.ToTensor(), normalize])
    try:
        trainset = torchvision.datasets.CIFAR10(root=data_root, train=True, download=True, transform=train_transform)
        testset = torchvision.datasets.CIFAR10(root=data_root, train=False, download=True, transform=test_transform)
    except Exception as exc:  # offline, or a broken download
        warnings.warn(f"Falling back to synthetic CIFAR-10 data: {exc}")
        return load_cifar10(batch_size=batch_size, generator=generator, data_root=data_root, num_workers=0, mock=True)

    options = {"batch_size": batch_size, "num_workers": num_workers, "pin_memory": True}
    if num_workers > 0:
        options.update(persistent_workers=True, prefetch_factor=2)
    return (
        DataLoader(trainset, shuffle=True, generator=generator, **options),
        DataLoader(testset, shuffle=False, **options),
    )


class TinyStoriesDataset(Dataset):
    """TinyStories cut into ``block_size + 1``-token windows for next-token prediction.

    ``mock=True`` gives ``max_samples`` (default 16) random windows from a generator seeded
    with 0. Otherwise the split is tokenised with GPT-2's tokenizer (``datasets`` and
    ``transformers`` required).
    """

    def __init__(
        self,
        split: str = "train",
        block_size: int = 256,
        max_samples: int | None = None,
        mock: bool = False,
        vocab_size: int = GPT2_VOCAB_SIZE,
    ):
        self.block_size = block_size
        if mock:
            rng = torch.Generator().manual_seed(0)
            self.examples = [
                torch.randint(0, vocab_size, (block_size + 1,), generator=rng).tolist()
                for _ in range(max_samples or 16)
            ]
            return
        try:
            from datasets import load_dataset
            from transformers import GPT2TokenizerFast
        except ImportError as exc:
            raise ImportError(
                "TinyStories requires 'datasets' and 'transformers' packages. "
                "Install with: pip install datasets transformers"
            ) from exc

        self.tokenizer = GPT2TokenizerFast.from_pretrained("gpt2")
        self.tokenizer.pad_token = self.tokenizer.eos_token
        dataset = load_dataset("roneneldan/TinyStories", split=split)
        if max_samples:
            dataset = dataset.select(range(min(max_samples, len(dataset))))
        self.examples: list[list[int]] = []
        for example in dataset:
            tokens = self.tokenizer.encode(example["text"])
            for start in range(0, len(tokens) - block_size, block_size):
                self.examples.append(tokens[start : start + block_size + 1])

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.tensor(self.examples[idx], dtype=torch.long)
        return tokens[:-1], tokens[1:]


def load_tinystories(
    block_size: int = 256,
    batch_size: int = 32,
    max_train_samples: int | None = None,
    max_val_samples: int | None = None,
    num_workers: int = 0,
    mock: bool = False,
) -> tuple[DataLoader, DataLoader]:
    """``(train_loader, val_loader)`` of TinyStories (see :class:`TinyStoriesDataset`)."""
    train = TinyStoriesDataset(split="train", block_size=block_size, max_samples=max_train_samples, mock=mock)
    val = TinyStoriesDataset(split="validation", block_size=block_size, max_samples=max_val_samples, mock=mock)
    pin = not mock
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, num_workers=num_workers, pin_memory=pin),
        DataLoader(val, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin),
    )
