"""The ``esper-fast`` application: a complete seed lifecycle run that loses nothing.

The layers below it (leyline, kasmina, tolaria, runtime, utils: esper-lite's API; ops: the
kernels) know nothing of it. Where things are:

- :mod:`~esper_fast.train.cli` is the command line (``esper-fast``, ``python -m esper_fast``):
  train, plot, bench, info; it turns flags into settings and user mistakes into one line;
- :mod:`~esper_fast.train.command` is ``esper-fast train`` as a function (:func:`train`):
  the folder's lock and checks, start or resume, the exit status;
- :mod:`~esper_fast.train.launch` runs it on several processes (``--nproc``, torchrun),
  showing the user what one process shows;
- :mod:`~esper_fast.train.settings` holds what a run is given (:class:`RunConfig`), the
  task defaults and the slot and blueprint rules;
- :mod:`~esper_fast.train.loop` trains (the epoch loop), :mod:`~esper_fast.train.session`
  begins, saves, resumes and ends a run (its records, checkpoints, summary and plot);
- :mod:`~esper_fast.train.controller` decides (germinate, advance, fossilize or cull), a
  controller per seed slot;
- :mod:`~esper_fast.train.optimizers` holds the host's and the seeds' optimizers and their
  learning rate;
- :mod:`~esper_fast.train.watch` watches each step (losses for the governor, batches,
  kernel tally, progress bar);
- :mod:`~esper_fast.train.report` owns the log's records (the config record, the epoch
  record with its per-slot records, the summary) and prints a run's lines;
- :mod:`~esper_fast.train.checkpoint` owns the checkpoint: what it holds, as plain data
  (:class:`Checkpoint`), how it is captured, checked and put back into a run;
- :mod:`~esper_fast.train.run_dir` writes (the run folder: lock, ``run.json``,
  ``metrics.jsonl``, checkpoints, ``metrics.png``);
- :mod:`~esper_fast.train.datasets` reads the offline datasets (CIFAR-10 from disk, a text
  file, or generated stand-ins), sharded over the ranks;
- :mod:`~esper_fast.train.plotting` draws ``metrics.png`` from the epoch records;
- :mod:`~esper_fast.train.interrupts` turns SIGINT/SIGTERM into clean stops;
- :mod:`~esper_fast.train.ranks` joins a ``torchrun`` job and moves what the ranks agree on;
- :mod:`~esper_fast.train.console`: a terminal that may go away.
"""

from __future__ import annotations

from esper_fast.train.checkpoint import Checkpoint, ResumeError
from esper_fast.train.command import check_out, train
from esper_fast.train.controller import LifecycleSchedule, SeedController, SeedRecord
from esper_fast.train.interrupts import ForcedStop, StopSignals
from esper_fast.train.loop import LifecycleRun
from esper_fast.train.ranks import Ranks, RanksDivergedError
from esper_fast.train.report import EpochRecord
from esper_fast.train.run_dir import (
    CHECKPOINT_DIR,
    LOCK_FILE,
    METRICS_FILE,
    PLOT_FILE,
    STATUS_FILE,
    RunDir,
    RunDirError,
    RunWriteError,
    SilentRunDir,
    read_log,
)
from esper_fast.train.settings import DEFAULT_KEEP_CHECKPOINTS, DEFAULT_OUT, TASK_DEFAULTS, TASKS, RunConfig, resolve
from esper_fast.train.watch import Batches, KernelTally, LossWatch, Progress

__all__ = [
    "train", "RunConfig", "resolve", "TASKS", "TASK_DEFAULTS", "DEFAULT_OUT", "DEFAULT_KEEP_CHECKPOINTS",
    "LifecycleRun", "LifecycleSchedule", "SeedController", "SeedRecord", "LossWatch", "Batches", "KernelTally",
    "Progress", "RunDir", "RunDirError", "RunWriteError", "SilentRunDir", "ResumeError", "StopSignals", "ForcedStop",
    "read_log", "Ranks", "RanksDivergedError", "check_out", "Checkpoint", "EpochRecord",
    "METRICS_FILE", "PLOT_FILE", "STATUS_FILE", "CHECKPOINT_DIR", "LOCK_FILE",
]
