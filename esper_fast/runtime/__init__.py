"""Runtime: task presets (host, task type, data, action space) by name."""

from esper_fast.runtime.config import LossRewardConfig, TaskConfig
from esper_fast.runtime.tasks import TaskSpec, get_task_spec

__all__ = ["TaskSpec", "get_task_spec", "TaskConfig", "LossRewardConfig"]
