"""Task presets: which host, which loss, which data, for each named task."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch.nn as nn

from esper_fast.kasmina.host import CNNHost, MorphogeneticModel, TransformerHost
from esper_fast.runtime.data import make_dataloaders, synthetic_images, synthetic_tokens


@dataclass
class TaskConfig:
    """Per-task settings the seed lifecycle reads (``SeedSlot.step_epoch``) and the loss scale."""

    task_type: str  # "classification" | "lm"
    topology: str  # "cnn" | "transformer"
    baseline_loss: float  # loss of a random guess
    target_loss: float  # a loss worth reaching
    max_epochs: int = 25
    train_to_blend_fraction: float = 0.1  # share of max_epochs a seed stays in TRAINING
    shadowing_fraction: float = 0.1  # share of max_epochs a seed stays in SHADOWING
    blending_steps: int = 5  # epochs of the alpha ramp

    @staticmethod
    def for_cifar10() -> "TaskConfig":
        return TaskConfig(task_type="classification", topology="cnn", baseline_loss=2.3, target_loss=0.3)

    @staticmethod
    def for_tinystories() -> "TaskConfig":
        return TaskConfig(task_type="lm", topology="transformer", baseline_loss=10.8, target_loss=3.5)


@dataclass
class TaskSpec:
    """Everything a training run needs to know about a task.

    ``model_factory(device)`` builds the :class:`MorphogeneticModel`;
    ``dataloader_factory(**params)`` returns ``(trainloader, testloader)`` and receives
    ``dataloader_defaults`` merged with the overrides given to :meth:`create_dataloaders`.
    """

    name: str
    topology: str
    task_type: str
    model_factory: Callable[[str], nn.Module]
    dataloader_factory: Callable[..., tuple]
    dataloader_defaults: dict[str, Any] = field(default_factory=dict)
    task_config: TaskConfig | None = None
    num_classes: int | None = None
    vocab_size: int | None = None
    block_size: int | None = None
    host_lr: float = 0.01
    seed_lr: float = 0.01

    def create_model(self, device: str = "cuda") -> nn.Module:
        return self.model_factory(device)

    def create_dataloaders(self, **overrides):
        """``(trainloader, testloader)``. Overrides replace defaults; ``dataset=(trainset,
        testset)`` uses the caller's data instead of the synthetic set."""
        unknown = set(overrides) - set(self.dataloader_defaults)
        if unknown:
            raise ValueError(
                f"unknown dataloader option(s) {sorted(unknown)} for task {self.name!r}; "
                f"choose from {sorted(self.dataloader_defaults)}"
            )
        return self.dataloader_factory(**{**self.dataloader_defaults, **overrides})


def _classification_loaders(
    dataset=None, batch_size=128, num_train=512, num_test=256, seed=0, num_workers=0,
    shuffle=True, pin_memory=False,
):
    if dataset is None:
        dataset = (synthetic_images(num_train, seed=seed), synthetic_images(num_test, seed=seed + 1))
    trainset, testset = dataset
    return make_dataloaders(trainset, testset, batch_size, num_workers, shuffle, seed, pin_memory)


def _lm_loaders(
    dataset=None, batch_size=32, num_train=256, num_test=64, block_size=256, seed=0,
    num_workers=0, shuffle=True, pin_memory=False,
):
    if dataset is None:
        dataset = (
            synthetic_tokens(num_train, block_size, seed=seed),
            synthetic_tokens(num_test, block_size, seed=seed + 1),
        )
    trainset, testset = dataset
    return make_dataloaders(trainset, testset, batch_size, num_workers, shuffle, seed, pin_memory)


_LOADER_COMMON = {"dataset": None, "num_workers": 0, "shuffle": True, "seed": 0, "pin_memory": False}


def _cifar10_spec() -> TaskSpec:
    config = TaskConfig.for_cifar10()

    def make_model(device: str) -> MorphogeneticModel:
        # A deliberately weak host (8 base channels) leaves seeds room to help.
        return MorphogeneticModel(CNNHost(num_classes=10, base_channels=8), device=device, task_config=config)

    return TaskSpec(
        name="cifar10",
        topology="cnn",
        task_type="classification",
        model_factory=make_model,
        dataloader_factory=_classification_loaders,
        dataloader_defaults={**_LOADER_COMMON, "batch_size": 128, "num_train": 512, "num_test": 256},
        task_config=config,
        num_classes=10,
    )


def _tinystories_spec() -> TaskSpec:
    config = TaskConfig.for_tinystories()
    vocab_size, block_size = 50257, 256

    def make_model(device: str) -> MorphogeneticModel:
        host = TransformerHost(vocab_size=vocab_size, n_embd=384, n_head=6, n_layer=6, block_size=block_size, dropout=0.1)
        return MorphogeneticModel(host, device=device, task_config=config)

    return TaskSpec(
        name="tinystories",
        topology="transformer",
        task_type="lm",
        model_factory=make_model,
        dataloader_factory=_lm_loaders,
        dataloader_defaults={
            **_LOADER_COMMON, "batch_size": 32, "num_train": 256, "num_test": 64,
            "block_size": block_size,
        },
        task_config=config,
        vocab_size=vocab_size,
        block_size=block_size,
    )


TASKS: dict[str, Callable[[], TaskSpec]] = {"cifar10": _cifar10_spec, "tinystories": _tinystories_spec}


def get_task_spec(name: str) -> TaskSpec:
    """A fresh :class:`TaskSpec` for ``name`` (case-insensitive)."""
    factory = TASKS.get(str(name).lower())
    if factory is None:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return factory()


__all__ = ["TaskConfig", "TaskSpec", "get_task_spec", "TASKS"]
