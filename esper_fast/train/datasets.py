"""Offline datasets for the command line: CIFAR-10 from disk, or generated stand-ins.

Nothing here downloads. ``cifar10`` uses torchvision's on-disk format when it is present
under the data root; otherwise :func:`synthetic_images` generates a deterministic 10-class
3x32x32 set that a small CNN learns well above chance in a few CPU epochs without reaching
100% at once, so a seed has room to help. ``tinystories`` reads a local text file or
generates a small corpus, tokenised bytewise: a text file is read as bytes, never decoded,
so any file (UTF-8, another encoding, binary) gives one token per byte (ids < 256 fit every
vocabulary here).

Batches are gathered with one indexing operation per batch (a ``BatchSampler`` handed to the
``DataLoader`` as its sampler) instead of one Python call per sample.

In a run of several processes (``world_size`` > 1) each rank reads its shard: the training
split through a ``DistributedSampler`` (shuffled from the run's seed and the epoch, padded so
every rank takes the same number of steps), the validation split through a
:class:`ShardSampler` (every ``world_size``-th sample, not padded, so the metrics summed over
the ranks count each sample exactly once).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

# torchvision's CIFAR-10 channel statistics, applied to the generated set as well.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_FOLDER = "cifar-10-batches-py"
DEFAULT_DATA_ROOT = "./data"
BYTE_VOCAB_SIZE = 256


class DataError(Exception):
    """A data source the user asked for cannot be used; the message says why in one line."""


@dataclasses.dataclass
class DataBundle:
    """The loaders a run uses and where they came from."""

    trainloader: DataLoader
    testloader: DataLoader
    source: str          # "cifar10", "synthetic-cifar10", "text-file", "synthetic-text"
    description: str     # one human-readable line, printed at start-up
    num_classes: int | None = None
    # sha256 of a text file's bytes: a resumed run checks it is still reading the same data
    fingerprint: str | None = None

    @property
    def shuffle_generator(self) -> torch.Generator | None:
        """The generator that orders the training batches (its state is the batch order to come).
        None for a sharded loader, whose order is a function of the seed and the epoch."""
        return shuffle_generator(self.trainloader)

    def set_epoch(self, epoch: int) -> None:
        """Tells sharded loaders which epoch comes next (their shuffle depends on it); a
        one-process loader keeps its generator and ignores this."""
        for loader in (self.trainloader, self.testloader):
            order = getattr(loader.sampler, "sampler", None)
            if isinstance(order, DistributedSampler):
                order.set_epoch(epoch)


class ImageBatches(Dataset):
    """uint8 images ``[N, 3, H, W]`` with int64 labels; indexing by a list of indices returns a
    normalised float32 batch. Kept as uint8 so the full CIFAR-10 train set stays at 150 MB."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels must be [N] with N={images.shape[0]}, got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()
        self.scale = (1.0 / (255.0 * torch.tensor(std))).view(1, -1, 1, 1)
        self.shift = (torch.tensor(mean) / torch.tensor(std)).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index):
        idx = torch.as_tensor(index, dtype=torch.long)
        x = self.images[idx.reshape(-1)].float() * self.scale - self.shift
        return (x[0], self.labels[idx]) if idx.dim() == 0 else (x, self.labels[idx])


class TokenBlocks(Dataset):
    """A 1-D token stream cut into ``(x, y)`` windows of ``seq_len`` tokens, y shifted by one."""

    def __init__(self, tokens: torch.Tensor, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.tokens = tokens.long()
        self.seq_len = seq_len
        self.count = max(0, (tokens.numel() - 1) // seq_len)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index):
        starts = torch.as_tensor(index, dtype=torch.long).reshape(-1, 1) * self.seq_len
        offsets = torch.arange(self.seq_len + 1).reshape(1, -1)
        window = self.tokens[starts + offsets]
        x, y = window[:, :-1], window[:, 1:]
        if not isinstance(index, (list, tuple, torch.Tensor)):
            x, y = x[0], y[0]
        return x, y


class ShardSampler(Sampler[int]):
    """Samples ``rank, rank + world_size, ...`` of ``dataset`` in order: a validation shard.
    Unlike ``DistributedSampler(shuffle=False)`` it does not pad the shards to equal length
    with repeated samples, so the shards together hold every sample exactly once."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.length, self.rank, self.world_size = len(dataset), rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def batch_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, seed: int, pin_memory: bool, rank: int = 0, world_size: int = 1
) -> DataLoader:
    """A DataLoader that fetches each batch with one indexing call on ``dataset``. With
    ``world_size`` > 1, rank ``rank``'s shard: a ``DistributedSampler`` (seeded with
    ``seed``; call its ``set_epoch``) when ``shuffle``, else a :class:`ShardSampler`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size > 1 and shuffle:
        # The sampler seeds with seed + epoch, which must stay below 2**64.
        order = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed % 2**63)
    elif world_size > 1:
        order = ShardSampler(dataset, rank, world_size)
    elif shuffle:
        generator = torch.Generator().manual_seed(seed)
        order = RandomSampler(dataset, generator=generator)
    else:
        order = SequentialSampler(dataset)
    return DataLoader(
        dataset,
        sampler=BatchSampler(order, batch_size=batch_size, drop_last=False),
        batch_size=None,
        num_workers=0,
        pin_memory=pin_memory,
    )


def shuffle_generator(loader: DataLoader) -> torch.Generator | None:
    """The generator of a :func:`batch_loader` that shuffles (None for one that does not)."""
    order = getattr(loader.sampler, "sampler", None)
    return getattr(order, "generator", None)


# ---------------------------------------------------------------- images

def synthetic_images(num_samples: int, seed: int = 0, size: int = 32, noise: float = 0.45):
    """Deterministic 10-class colour images ``(uint8 [N, 3, size, size], int64 [N])``.

    Class ``c`` is a sinusoidal grating at one of five orientations (``c % 5``) inside a soft
    disc, painted with one of two colour pairs (``c // 5``), at a random position, phase,
    frequency, contrast and tint, over a random-orientation distractor grating and Gaussian
    noise. Colour is easy, orientation under clutter is not: a small CNN passes chance in
    its first epoch and keeps improving for several more.
    """
    g = torch.Generator().manual_seed(seed)
    n = num_samples
    labels = torch.arange(n) % 10
    labels = labels[torch.randperm(n, generator=g)]

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    yy, xx = coords.view(1, -1, 1), coords.view(1, 1, -1)

    def grating(theta, freq, phase):
        theta, freq, phase = (t.view(-1, 1, 1) for t in (theta, freq, phase))
        return torch.cos(2 * math.pi * freq * (xx * torch.cos(theta) + yy * torch.sin(theta)) + phase)

    orientation = (labels % 5).float() * (math.pi / 5) + uniform(-0.12, 0.12, n)
    signal = grating(orientation, uniform(0.11, 0.17, n), uniform(0, 2 * math.pi, n))
    distractor = grating(uniform(0, math.pi, n), uniform(0.05, 0.25, n), uniform(0, 2 * math.pi, n))

    # A soft disc at a random offset holds the class pattern.
    cy, cx = uniform(-6, 6, n).view(-1, 1, 1), uniform(-6, 6, n).view(-1, 1, 1)
    radius = uniform(7, 11, n).view(-1, 1, 1)
    window = torch.sigmoid((radius - torch.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)) / 1.5)

    # Two colour pairs: the grating's bright and dark phases take different colours.
    palettes = torch.tensor(
        [[[0.85, 0.45, 0.20], [0.20, 0.35, 0.75]],   # warm on cool
         [[0.30, 0.75, 0.35], [0.70, 0.25, 0.65]]],  # green on magenta
    )
    pair = palettes[labels // 5]                                         # [N, 2, 3]
    tint = uniform(-0.15, 0.15, n, 2, 3)
    bright = (pair[:, 0] + tint[:, 0]).view(n, 3, 1, 1)
    dark = (pair[:, 1] + tint[:, 1]).view(n, 3, 1, 1)
    mix = (0.5 + 0.5 * signal).unsqueeze(1)                              # [N, 1, H, W]
    pattern = dark + (bright - dark) * mix

    background = uniform(0.3, 0.6, n, 3, 1, 1) + 0.12 * distractor.unsqueeze(1)
    contrast = uniform(0.5, 1.0, n).view(-1, 1, 1, 1)
    w = window.unsqueeze(1) * contrast
    image = background * (1 - w) + pattern * w
    image = image + noise * torch.randn(n, 3, size, size, generator=g) * uniform(0.5, 1.0, n).view(-1, 1, 1, 1)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8), labels


@functools.lru_cache(maxsize=2)
def _generated_cifar10(num_train: int, num_test: int):
    """The generated train and test sets, built once per process (the tensors are shared:
    nothing here writes to them)."""
    # Test images come from a different generator stream than the train images.
    return synthetic_images(num_train, seed=1), synthetic_images(num_test, seed=2)


def cifar10_present(root: str | os.PathLike) -> bool:
    return (Path(root) / CIFAR10_FOLDER / "batches.meta").is_file()


def load_cifar10_arrays(root: str | os.PathLike, train: bool):
    """CIFAR-10 from torchvision's on-disk format as ``(uint8 [N, 3, 32, 32], int64 [N])``."""
    try:
        from torchvision.datasets import CIFAR10
    except ImportError as exc:
        raise DataError(f"reading CIFAR-10 needs torchvision, which is not installed ({exc})") from exc
    try:
        dataset = CIFAR10(root=str(root), train=train, download=False)
    except RuntimeError as exc:  # torchvision's message for missing or corrupted files
        raise DataError(f"CIFAR-10 under {root} is incomplete or corrupted ({exc})") from exc
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(dataset.targets, dtype=torch.long)


def cifar10_loaders(
    data_root: str | None = None,
    batch_size: int = 128,
    seed: int = 0,
    pin_memory: bool = False,
    synthetic_train: int = 8000,
    synthetic_test: int = 1600,
    rank: int = 0,
    world_size: int = 1,
) -> DataBundle:
    """CIFAR-10 loaders. ``data_root`` given: CIFAR-10 must be there (else :class:`DataError`).
    Not given: ``./data`` is used when it holds CIFAR-10, the generated set otherwise.
    ``rank``/``world_size``: this rank's shards (see the module docstring)."""
    root = data_root if data_root is not None else DEFAULT_DATA_ROOT
    if cifar10_present(root):
        train = load_cifar10_arrays(root, train=True)
        test = load_cifar10_arrays(root, train=False)
        source = "cifar10"
        description = f"CIFAR-10 from {Path(root) / CIFAR10_FOLDER} ({len(train[1])} train / {len(test[1])} test images)"
    elif data_root is not None:
        raise DataError(
            f"CIFAR-10 not found under --data-root {data_root} (expected {Path(data_root) / CIFAR10_FOLDER}, "
            "torchvision's format; nothing is downloaded). Omit --data-root to use the generated offline set."
        )
    else:
        train, test = _generated_cifar10(synthetic_train, synthetic_test)
        source = "synthetic-cifar10"
        description = (
            f"no CIFAR-10 under {root}: using the generated offline set "
            f"(10 classes of oriented colour gratings, 3x32x32, {synthetic_train} train / {synthetic_test} test, deterministic)"
        )
    shard = {"rank": rank, "world_size": world_size}
    trainloader = batch_loader(ImageBatches(*train), batch_size, shuffle=True, seed=seed, pin_memory=pin_memory, **shard)
    testloader = batch_loader(ImageBatches(*test), batch_size, shuffle=False, seed=seed, pin_memory=pin_memory, **shard)
    return DataBundle(trainloader, testloader, source, description, num_classes=10)


# ---------------------------------------------------------------- text

_SUBJECTS = ["Lily", "Tom", "the little dog", "a small bird", "Mia", "the old cat", "Ben", "a happy frog"]
_PLACES = ["the park", "the garden", "the forest", "the beach", "the big red house", "the pond"]
_OBJECTS = ["a ball", "a shiny stone", "a red kite", "a box of toys", "a warm cake", "a blue hat"]
_FEELINGS = ["happy", "sad", "scared", "excited", "tired", "proud"]
_ENDINGS = [
    "They played until the sun went down.",
    "From that day on, they were best friends.",
    "Everyone laughed and went home together.",
    "It was the best day ever.",
    "Then they shared it with all their friends.",
]


def synthetic_stories(num_stories: int, seed: int = 0) -> str:
    """A deterministic corpus of short, repetitive children's stories (learnable structure)."""
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    stories = []
    for _ in range(num_stories):
        who, friend = pick(_SUBJECTS), pick(_SUBJECTS)
        where, thing, feeling = pick(_PLACES), pick(_OBJECTS), pick(_FEELINGS)
        stories.append(
            f"Once upon a time, {who} went to {where}. {who.capitalize()} found {thing}. "
            f"{who.capitalize()} felt {feeling}. Then {friend} came to {where} and saw {thing}. "
            f"\"Can I play too?\" asked {friend}. \"Yes!\" said {who}. {pick(_ENDINGS)}"
        )
    return "\n".join(stories) + "\n"


def encode_bytes(text: str | bytes) -> torch.Tensor:
    """Bytes (a ``str`` is UTF-8 encoded first) as int64 token ids in [0, 256)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    if not data:
        return torch.empty(0, dtype=torch.long)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def read_text_bytes(text_path: str | os.PathLike) -> bytes:
    """The bytes of a text file for the byte tokenizer; :class:`DataError` if it is missing,
    unreadable or empty."""
    path = Path(text_path)
    if not path.exists():
        raise DataError(f"text file not found: {text_path}")
    if not path.is_file():
        raise DataError(f"--text {text_path} is not a file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read text file {text_path} ({exc.strerror or exc})") from exc
    if not data:
        raise DataError(f"text file {text_path} is empty")
    return data


def decode_bytes(tokens) -> str:
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def tinystories_loaders(
    text_path: str | None = None,
    seq_len: int = 256,
    batch_size: int = 32,
    seed: int = 0,
    pin_memory: bool = False,
    vocab_size: int = BYTE_VOCAB_SIZE,
    synthetic_stories_count: int = 2000,
    rank: int = 0,
    world_size: int = 1,
) -> DataBundle:
    """Byte-level language-model loaders over a local text file or a generated corpus.

    The last tenth of the token stream is held out for validation. ``rank``/``world_size``:
    this rank's shards (see the module docstring).
    """
    if vocab_size < BYTE_VOCAB_SIZE:
        raise DataError(f"the byte tokenizer needs a vocabulary of at least {BYTE_VOCAB_SIZE}, the model has {vocab_size}")
    fingerprint = None
    if text_path is not None:
        text = read_text_bytes(text_path)
        fingerprint = hashlib.sha256(text).hexdigest()
        source, what = "text-file", f"{text_path}"
    else:
        text = synthetic_stories(synthetic_stories_count, seed=1)
        source, what = "synthetic-text", f"the generated offline story corpus ({synthetic_stories_count} stories)"
    tokens = encode_bytes(text)
    split = int(tokens.numel() * 0.9)
    train, test = TokenBlocks(tokens[:split], seq_len), TokenBlocks(tokens[split:], seq_len)
    if len(train) == 0 or len(test) == 0:
        raise DataError(
            f"{what} is too short for sequences of {seq_len} tokens ({tokens.numel()} bytes); "
            "give a longer text or a smaller --seq-len"
        )
    description = f"byte-level text from {what}: {tokens.numel()} tokens, {len(train)} train / {len(test)} val sequences of {seq_len}"
    shard = {"rank": rank, "world_size": world_size}
    trainloader = batch_loader(train, batch_size, shuffle=True, seed=seed, pin_memory=pin_memory, **shard)
    testloader = batch_loader(test, batch_size, shuffle=False, seed=seed, pin_memory=pin_memory, **shard)
    return DataBundle(trainloader, testloader, source, description, fingerprint=fingerprint)


def task_data(config, spec, rank: int = 0, world_size: int = 1) -> DataBundle:
    """The loaders of ``spec``'s task for a run of ``config`` (resolved), this rank's shards
    when ``world_size`` > 1."""
    pin = config.device.startswith("cuda")
    shard = {} if world_size == 1 else {"rank": rank, "world_size": world_size}
    if spec.task_type == "lm":
        if spec.block_size and config.seq_len > spec.block_size:
            raise DataError(f"--seq-len {config.seq_len} exceeds the model's block size {spec.block_size}")
        return tinystories_loaders(
            text_path=config.text_path,
            seq_len=config.seq_len,
            batch_size=config.batch_size,
            seed=config.seed,
            pin_memory=pin,
            vocab_size=spec.vocab_size or BYTE_VOCAB_SIZE,
            **shard,
        )
    return cifar10_loaders(data_root=config.data_root, batch_size=config.batch_size, seed=config.seed,
                           pin_memory=pin, **shard)
