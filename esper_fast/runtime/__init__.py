"""Runtime: task presets (host, task type, data) by name."""

from esper_fast.runtime.data import make_dataloaders, synthetic_images, synthetic_tokens
from esper_fast.runtime.tasks import TASKS, TaskConfig, TaskSpec, get_task_spec

__all__ = ["TaskSpec", "TaskConfig", "get_task_spec", "TASKS", "make_dataloaders", "synthetic_images", "synthetic_tokens"]
