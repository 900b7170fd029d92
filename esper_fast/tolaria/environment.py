"""The model factory: a MorphogeneticModel for a task, on a device."""

from __future__ import annotations

import torch
import torch.nn as nn

from esper_fast.runtime import TaskSpec, get_task_spec


def _check_device(device: str) -> None:
    """Fail clearly, before anything is built, when a CUDA device is asked for and absent."""
    requested = torch.device(device)
    if requested.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"CUDA device '{device}' requested but CUDA is not available. "
            "Use device='cpu' or check your CUDA installation."
        )
    if requested.index is not None and requested.index >= torch.cuda.device_count():
        raise RuntimeError(
            f"CUDA device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) are available"
        )


def create_model(task: TaskSpec | str = "cifar10", device: str = "cuda") -> nn.Module:
    """A :class:`~esper_fast.kasmina.MorphogeneticModel` for ``task`` (a TaskSpec or a task
    name) on ``device``.

    Raises RuntimeError ("CUDA ... not available") for a CUDA device without CUDA, and
    ValueError for an unknown task name.
    """
    spec = get_task_spec(task) if isinstance(task, str) else task
    _check_device(device)
    return spec.create_model(device=device)


__all__ = ["create_model"]
