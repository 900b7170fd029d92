"""Per-task settings the task presets carry: the lifecycle's dwell times and loss scales
(:class:`TaskConfig`) and the loss-based reward weights (:class:`LossRewardConfig`).

Field for field the records esper-lite's controllers read (its ``simic.features.TaskConfig``
and ``simic.rewards.LossRewardConfig``), with the same presets.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TaskConfig", "LossRewardConfig"]


@dataclass(slots=True)
class TaskConfig:
    """What a task's lifecycle and observation scaling need to know."""

    task_type: str  # "classification" | "lm"
    topology: str  # "cnn" | "transformer"
    baseline_loss: float  # loss of an untrained model
    target_loss: float  # a loss worth reaching
    typical_loss_delta_std: float
    max_epochs: int
    max_steps: int = 10000
    shadowing_fraction: float = 0.1  # of max_epochs spent in SHADOWING (at least 1 epoch)
    train_to_blend_fraction: float = 0.1  # of max_epochs spent in TRAINING before blending
    blending_steps: int = 5  # steps of the alpha ramp

    @property
    def achievable_range(self) -> float:
        return self.baseline_loss - self.target_loss

    @staticmethod
    def for_cifar10() -> "TaskConfig":
        return TaskConfig(
            task_type="classification", topology="cnn", baseline_loss=2.3, target_loss=0.3,
            typical_loss_delta_std=0.05, max_epochs=25, max_steps=10000,
        )

    @staticmethod
    def for_tinystories() -> "TaskConfig":
        return TaskConfig(
            task_type="lm", topology="transformer", baseline_loss=10.8, target_loss=3.5,
            typical_loss_delta_std=0.15, max_epochs=50, max_steps=50000,
        )


@dataclass(slots=True)
class LossRewardConfig:
    """Weights of a loss-primary reward (normalised loss delta, compute rent, stage bonus)."""

    loss_delta_weight: float = 5.0
    max_loss_delta: float = 5.0
    regression_penalty_scale: float = 0.5
    typical_loss_delta_std: float = 0.1
    compute_rent_weight: float = 0.05
    max_rent_penalty: float = 5.0
    grace_epochs: int = 3
    stage_potential_weight: float = 0.1
    baseline_loss: float = 2.3
    target_loss: float = 0.3
    terminal_loss_weight: float = 1.0

    @property
    def achievable_range(self) -> float:
        return self.baseline_loss - self.target_loss

    @staticmethod
    def default() -> "LossRewardConfig":
        return LossRewardConfig()

    @staticmethod
    def for_cifar10() -> "LossRewardConfig":
        return LossRewardConfig(baseline_loss=2.3, target_loss=0.3, typical_loss_delta_std=0.05)

    @staticmethod
    def for_tinystories() -> "LossRewardConfig":
        return LossRewardConfig(
            baseline_loss=10.8, target_loss=3.5, typical_loss_delta_std=0.15, compute_rent_weight=0.01
        )
