"""Task presets: which host, task type, data and action space for each named task."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from esper_fast.kasmina.host import CNNHost, MorphogeneticModel, TransformerHost
from esper_fast.leyline.actions import build_action_enum
from esper_fast.runtime.config import LossRewardConfig, TaskConfig
from esper_fast.utils.data import load_cifar10, load_tinystories

__all__ = ["TaskSpec", "get_task_spec"]


@dataclass(slots=True)
class TaskSpec:
    """Everything a training run needs to know about a task.

    ``model_factory(device)`` builds the :class:`MorphogeneticModel` (``model_factory(device,
    slots=...)`` with seed slots at those injection points, see :meth:`create_model`);
    ``dataloader_factory(**params)`` returns ``(trainloader, testloader)`` and receives
    ``dataloader_defaults`` merged with the overrides given to :meth:`create_dataloaders`.
    ``action_enum`` is the topology's action space, built from the registered blueprints.
    """

    name: str
    topology: str
    task_type: str  # "classification" | "lm"
    model_factory: Callable[[str], MorphogeneticModel]
    dataloader_factory: Callable[..., tuple]
    dataloader_defaults: dict[str, Any] = field(default_factory=dict)
    task_config: TaskConfig = field(default_factory=TaskConfig.for_cifar10)
    loss_reward_config: LossRewardConfig = field(default_factory=LossRewardConfig.default)
    vocab_size: int | None = None
    num_classes: int | None = None
    block_size: int | None = None
    action_enum: Any = field(init=False)

    def __post_init__(self) -> None:
        self.action_enum = build_action_enum(self.topology)

    def create_model(self, device: str = "cuda:0", slots: list[str] | None = None) -> MorphogeneticModel:
        """The task's model on ``device``; ``slots``: its seed slots (injection points of the
        host; the first in the host's order is the main slot), default the task's one slot.
        The host is drawn from the same random numbers whatever the slots."""
        if slots is None:
            return self.model_factory(device)
        return self.model_factory(device, slots=slots)

    def create_dataloaders(self, **overrides):
        """``(trainloader, testloader)`` from the defaults updated with ``overrides``."""
        return self.dataloader_factory(**{**self.dataloader_defaults, **overrides})


def _cifar10_spec() -> TaskSpec:
    config = TaskConfig.for_cifar10()

    def make_model(device: str, slots: list[str] | None = None) -> MorphogeneticModel:
        # A deliberately weak host (8 base channels) leaves seeds room to help.
        return MorphogeneticModel(CNNHost(num_classes=10, base_channels=8), device=device, task_config=config,
                                  slots=slots)

    return TaskSpec(
        name="cifar10",
        topology="cnn",
        task_type="classification",
        model_factory=make_model,
        dataloader_factory=load_cifar10,
        dataloader_defaults={"batch_size": 128, "data_root": "./data", "num_workers": 4, "mock": False, "generator": None},
        task_config=config,
        loss_reward_config=LossRewardConfig.for_cifar10(),
        num_classes=10,
    )


def _tinystories_spec() -> TaskSpec:
    config = TaskConfig.for_tinystories()
    vocab_size, block_size = 50257, 256

    def make_model(device: str, slots: list[str] | None = None) -> MorphogeneticModel:
        host = TransformerHost(
            vocab_size=vocab_size, n_embd=384, n_head=6, n_layer=6, block_size=block_size, dropout=0.1
        )
        return MorphogeneticModel(host, device=device, task_config=config, slots=slots)

    return TaskSpec(
        name="tinystories",
        topology="transformer",
        task_type="lm",
        model_factory=make_model,
        dataloader_factory=load_tinystories,
        dataloader_defaults={
            "block_size": block_size, "batch_size": 32, "max_train_samples": None,
            "max_val_samples": None, "num_workers": 0, "mock": False,
        },
        task_config=config,
        loss_reward_config=LossRewardConfig.for_tinystories(),
        vocab_size=vocab_size,
        block_size=block_size,
    )


_PRESETS = {"cifar10": _cifar10_spec, "tinystories": _tinystories_spec}


def get_task_spec(name: str) -> TaskSpec:
    """A fresh :class:`TaskSpec` for ``name`` (case-insensitive); ValueError listing the
    choices for an unknown name."""
    preset = _PRESETS.get(name.lower())
    if preset is None:
        raise ValueError(f"Unknown task '{name}'. Available: {', '.join(_PRESETS)}")
    return preset()
