"""Pure-PyTorch references: the original Esper algorithms, kept as the tests' oracle and the
benchmarks' baseline. Nothing here calls an esper_fast kernel.
"""

from __future__ import annotations

import copy
from typing import Mapping

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- blend family

def per_sample_alpha(alpha, like: torch.Tensor):
    """alpha as the original applies it: a float clamped to [0, 1], or a tensor clamped and
    reshaped to broadcast over every dimension but the batch dimension of ``like``."""
    if isinstance(alpha, torch.Tensor):
        a = alpha.clamp(0.0, 1.0).to(like.dtype)
        if a.dim() == 0 or a.numel() == 1:
            return a.reshape(())
        return a.reshape(a.shape[0], *([1] * (like.dim() - 1)))
    return max(0.0, min(1.0, float(alpha)))


def blend_reference(host: torch.Tensor, seed: torch.Tensor, alpha, detach_host: bool = True) -> torch.Tensor:
    """The original composite blend: ``torch.lerp`` towards the seed, host detached by default."""
    host_path = host.detach() if detach_host else host
    return torch.lerp(host_path, seed, per_sample_alpha(alpha, host))


def ste_reference(host: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """The original straight-through estimator: forward is host, backward feeds host and seed."""
    return host + (seed - seed.detach())


# ---------------------------------------------------------------- metrics family

def batch_loss_reference(outputs: torch.Tensor, labels: torch.Tensor, criterion, task_type: str) -> torch.Tensor:
    """The original ``_compute_loss``: lm outputs [B, T, V] are flattened before the criterion."""
    if task_type == "lm":
        vocab = outputs.size(-1)
        return criterion(outputs.view(-1, vocab), labels.view(-1))
    return criterion(outputs, labels)


def batch_metrics_reference(
    outputs: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int | None = None,
    per_class: bool = False,
    task_type: str = "classification",
) -> dict:
    """One batch of the original validation loop's counting, as device tensors.

    Returns ``correct`` and ``total`` (argmax accuracy over labels.size(0) for
    classification, labels.numel() for lm) and, with ``per_class``, the two bincounts.
    """
    if task_type == "lm":
        predicted = outputs.argmax(-1)
        total = labels.numel()
    else:
        _, predicted = outputs.max(1)
        total = labels.size(0)
    correct_mask = predicted == labels
    result = {"correct": correct_mask.sum(), "total": total}
    if per_class:
        result["class_total"] = torch.bincount(labels, minlength=num_classes)
        result["class_correct"] = torch.bincount(labels[correct_mask], minlength=num_classes)
    return result


def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``nn.CrossEntropyLoss()`` in float64: the oracle for the fused loss."""
    return F.cross_entropy(logits.double(), targets, ignore_index=ignore_index)


# ---------------------------------------------------------------- snapshot family

def snapshot_reference(model: torch.nn.Module, exclude: frozenset = frozenset()) -> dict:
    """The original governor snapshot: one synchronising ``.cpu().clone()`` per tensor."""
    return {
        key: value.detach().cpu().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
        for key, value in model.state_dict().items()
        if key not in exclude
    }


def snapshot_pinned_reference(model: torch.nn.Module, buffers: dict | None = None) -> dict:
    """The newer original: one reused pinned buffer per tensor, still one copy launch per tensor."""
    buffers = {} if buffers is None else buffers
    pin = torch.cuda.is_available()
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            continue
        target = buffers.get(key)
        if target is None or target.shape != value.shape or target.dtype != value.dtype:
            target = torch.empty(value.shape, dtype=value.dtype, device="cpu", pin_memory=pin)
            buffers[key] = target
        target.copy_(value.detach(), non_blocking=pin)
    if pin:
        torch.cuda.synchronize()
    return buffers


def restore_reference(model: torch.nn.Module, state: Mapping[str, object], strict: bool = True) -> None:
    """The original rollback: move each tensor to the model's device, then ``load_state_dict``."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    model.load_state_dict(on_device, strict=strict)
