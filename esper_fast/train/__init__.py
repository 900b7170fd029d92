"""``esper-fast train``: a complete seed lifecycle run that loses nothing.

Where things are:

- :mod:`~esper_fast.train.controller` decides (germinate, advance, fossilize or cull);
- :mod:`~esper_fast.train.loop` trains (the epoch loop, checkpoints and resume);
- :mod:`~esper_fast.train.watch` watches each step (losses for the governor, batches,
  kernel tally, progress bar);
- :mod:`~esper_fast.train.run_dir` writes (the run folder: lock, ``run.json``,
  ``metrics.jsonl``, checkpoints, ``metrics.png``);
- :mod:`~esper_fast.train.checkpoint` says what a checkpoint holds, as plain data;
- :mod:`~esper_fast.train.signals` turns SIGINT/SIGTERM into clean stops;
- :mod:`~esper_fast.train.config`, :mod:`~esper_fast.train.report` and
  :mod:`~esper_fast.train.console`: the run's settings, its printed lines, and a terminal
  that may go away.

:func:`train` is the command: it takes the folder's lock, checks what the folder holds,
starts or resumes the run and returns the exit status.
"""

from __future__ import annotations

import dataclasses
import os

from esper_fast.train.config import DEFAULT_KEEP_CHECKPOINTS, DEFAULT_OUT, TASK_DEFAULTS, TASKS, RunConfig, resolve
from esper_fast.train.console import warn
from esper_fast.train.controller import LifecycleSchedule, SeedController, SeedRecord
from esper_fast.train.loop import LifecycleRun, ResumeError
from esper_fast.train.run_dir import (
    CHECKPOINT_DIR,
    LOCK_FILE,
    METRICS_FILE,
    PLOT_FILE,
    STATUS_FILE,
    RunDir,
    RunDirError,
    read_log,
)
from esper_fast.train.signals import ForcedStop, StopSignals
from esper_fast.train.watch import Batches, KernelTally, LossWatch, Progress

__all__ = [
    "train", "RunConfig", "resolve", "TASKS", "TASK_DEFAULTS", "DEFAULT_OUT", "DEFAULT_KEEP_CHECKPOINTS",
    "LifecycleRun", "LifecycleSchedule", "SeedController", "SeedRecord", "LossWatch", "Batches", "KernelTally",
    "Progress", "RunDir", "RunDirError", "ResumeError", "StopSignals", "ForcedStop", "read_log",
    "METRICS_FILE", "PLOT_FILE", "STATUS_FILE", "CHECKPOINT_DIR", "LOCK_FILE",
]

# Settings a resumed run may change: none of them changes what the run computes on a device.
RESUME_OVERRIDES = ("device", "progress", "keep_checkpoints")


def _refusal(out: str, contents) -> str:
    described = contents.describe()
    if contents.kind == "unfinished":
        return (f"--out {out} holds {described}; continue it with `esper-fast train --resume {out}`, "
                "or give --overwrite to replace it")
    return f"--out {out} already holds {described}; choose another --out, or give --overwrite to replace it"


def train(
    config: RunConfig | None = None,
    *,
    resume: str | None = None,
    overrides: dict | None = None,
    overwrite: bool = False,
    command: str = "",
) -> int:
    """Runs ``esper-fast train`` and returns its exit status: 0 when the run finished, 130
    or 143 when SIGINT or SIGTERM stopped it (after writing a checkpoint, the summary and the
    plot).

    A new run takes ``config``; ``resume`` continues the run in that folder from its newest
    checkpoint, with its own settings (``overrides`` may change those of
    :data:`RESUME_OVERRIDES`). User mistakes raise :class:`RunDirError` or
    :class:`esper_fast.data.DataError` before the folder is changed.
    """
    from esper_fast.runtime import get_task_spec

    out = resume if resume is not None else config.out
    if resume is not None and not os.path.isdir(resume):
        raise RunDirError(f"--resume {resume}: no such run folder")
    run_dir = RunDir(out, warn=warn)
    run_dir.acquire(command)
    run = None
    try:
        with StopSignals() as stop:
            contents = run_dir.contents()
            if resume is not None:
                if contents.kind == "finished":
                    raise RunDirError(f"{out} holds {contents.describe()}; there is nothing to resume")
                if contents.kind != "unfinished":
                    raise RunDirError(f"nothing to resume in {out}: it holds no checkpoint")
                run_dir.remove_stale_temporaries()
                payload, path = run_dir.load_checkpoint()
                config = dataclasses.replace(RunConfig(**payload["config"]), out=out, **(overrides or {}))
            elif contents.kind != "empty" and not overwrite:
                raise RunDirError(_refusal(out, contents))
            run_dir.keep = config.keep_checkpoints
            config = resolve(config, get_task_spec(config.task).block_size)
            run = LifecycleRun(config, run_dir, stop)
            if resume is not None:
                run.resume_from(payload, path, command, contents.status)
            else:
                if contents.kind != "empty":
                    run_dir.clear()
                run.start(command)
            summary = run.execute()
    except ForcedStop as stopped:
        if run is not None:
            run_dir.write_status(status="interrupted", stopped_by=str(stopped))
        last = run.checkpoint_path if run is not None else None
        warn(f"esper-fast: stopped at once by a second {stopped}; "
             + (f"the last checkpoint is {last}; continue with: esper-fast train --resume {out}" if last else "nothing was saved"))
        return 128 + stopped.signum
    except BaseException as exc:
        if run is not None and not isinstance(exc, (RunDirError,)):
            run_dir.write_status(status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        run_dir.release()
    if summary["status"] == "interrupted":
        warn(f"esper-fast: stopped by {stop.name} after {summary['epochs']} of {config.epochs} epochs"
             + (f" (checkpoint {run.checkpoint_path})" if run.checkpoint_path else "")
             + f"; continue with: esper-fast train --resume {out}")
        return stop.exit_code
    return 0

