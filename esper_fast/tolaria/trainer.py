"""Tolaria's training loops, and the original's names of the validation functions.

The three ``train_epoch_*`` loops are the original's. The validation functions
(``validate_and_get_metrics``, ``validate_with_attribution``, and esper_fast's
``validate_epoch`` and ``slot_attribution``) live in :mod:`esper_fast.tolaria.validation`
and are named here too, where the original has them: one pass over the test set on the
fused metrics kernel measures the model as it is, its main slot's counterfactual and the
attribution of every live seed (:mod:`esper_fast.tolaria.attribution`).

Performance note: these functions are ``torch.compile`` compatible. For more speed, compile the
model before passing it in, e.g. ``train_epoch_normal(torch.compile(model), ...)``; the
metrics kernel is a registered custom op, so a compiled model's outputs feed it directly.
"""

from __future__ import annotations

import torch
from torch import nn

from esper_fast.tolaria.attribution import SlotAttribution
from esper_fast.tolaria.batches import Batch, BatchIterable, compute_loss, to_device  # noqa: F401
from esper_fast.tolaria.passes import grad_free as _grad_free  # noqa: F401  (the names tests use)
from esper_fast.tolaria.passes import shares_the_host_pass as _shares_the_host_pass  # noqa: F401
from esper_fast.tolaria.validation import (  # noqa: F401
    PERPLEXITY_LOSS_LIMIT,
    TRAIN_METRIC_BATCHES,
    AttributionResult,
    EpochValidation,
    slot_attribution,
    validate_and_get_metrics,
    validate_epoch,
    validate_with_attribution,
)

__all__ = [
    "AttributionResult",
    "EpochValidation",
    "validate_epoch",
    "SlotAttribution",
    "slot_attribution",
    "train_epoch_normal",
    "train_epoch_incubator_mode",
    "train_epoch_blended",
    "validate_and_get_metrics",
    "validate_with_attribution",
]


def _train_epoch(model, trainloader, criterion, optimizers, device, task_type) -> None:
    model.train()
    for batch in trainloader:
        inputs, labels = to_device(batch, device)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss = compute_loss(model(inputs), labels, criterion, task_type)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()


def train_epoch_normal(
    model: nn.Module,
    trainloader: BatchIterable,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: str,
    task_type: str = "classification",
) -> None:
    """One epoch of plain training: per batch zero_grad, forward, loss, backward, step.

    Leaves the model in train mode.
    """
    _train_epoch(model, trainloader, criterion, (optimizer,), device, task_type)


def train_epoch_incubator_mode(
    model: nn.Module,
    trainloader: BatchIterable,
    criterion: nn.Module,
    host_optimizer: torch.optim.Optimizer,
    seed_optimizer: torch.optim.Optimizer,
    device: str,
    task_type: str = "classification",
) -> None:
    """One epoch with the seed incubating: host and seed optimizers both zeroed and stepped.

    The seed's output does not change the forward pass; it learns through the straight-through
    estimator inside the slot, while the host trains as usual.
    """
    _train_epoch(model, trainloader, criterion, (host_optimizer, seed_optimizer), device, task_type)


def train_epoch_blended(
    model: nn.Module,
    trainloader: BatchIterable,
    criterion: nn.Module,
    host_optimizer: torch.optim.Optimizer,
    seed_optimizer: torch.optim.Optimizer | None,
    device: str,
    task_type: str = "classification",
) -> None:
    """One epoch of joint training of host and blended seed; ``seed_optimizer`` may be None."""
    optimizers = (host_optimizer,) if seed_optimizer is None else (host_optimizer, seed_optimizer)
    _train_epoch(model, trainloader, criterion, optimizers, device, task_type)
