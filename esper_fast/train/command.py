"""``esper-fast train`` as a function: :func:`train` takes the run folder's lock, checks what
the folder holds, starts or resumes the run and returns the exit status.

Under ``torchrun`` every process calls it: rank 0 does all of that and broadcasts what it
found (the settings, the checkpoint to resume from, or the error), the other ranks train
silently and never touch the folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

from esper_fast.runtime import get_task_spec
from esper_fast.train.checkpoint import Checkpoint
from esper_fast.train.console import say, warn, where_stopped
from esper_fast.train.interrupts import ForcedStop, StopSignals
from esper_fast.train.loop import LifecycleRun
from esper_fast.train.ranks import Ranks
from esper_fast.train.report import ConfigRecord
from esper_fast.train.run_dir import (
    METRICS_FILE,
    RunDir,
    RunDirError,
    RunWriteError,
    SilentRunDir,
    read_log,
    read_status,
    resume_command,
)
from esper_fast.train.settings import RunConfig, SettingsError, check_device, check_trainable, resolve

# Settings a resumed run may change: none of them changes what the run computes on a device.
RESUME_OVERRIDES = ("device", "progress", "keep_checkpoints")
# The exit status of a run that stopped because a file it needs could not be written.
EXIT_WRITE_FAILED = 1


def _refusal(out: str, contents) -> str:
    described = contents.describe()
    if contents.kind == "unfinished":
        return (f"--out {out} holds {described}; continue it with `{resume_command(out)}`, "
                "or give --overwrite to replace it")
    return f"--out {out} already holds {described}; choose another --out, or give --overwrite to replace it"


def _check_contents(run_dir: RunDir, out: str, resume: str | None, overwrite: bool):
    """What the (locked) folder holds, if the run may start or resume in it; else RunDirError."""
    contents = run_dir.contents()
    if resume is not None:
        if contents.kind == "finished":
            raise RunDirError(f"{out} holds {contents.describe()}; there is nothing to resume")
        if contents.kind != "unfinished":
            raise RunDirError(f"nothing to resume in {out}: it holds no checkpoint")
    elif contents.kind != "empty" and not overwrite:
        raise RunDirError(_refusal(out, contents))
    return contents


def check_out(out: str, *, resume: bool = False, overwrite: bool = False) -> None:
    """The checks :func:`train` makes of its folder, made early (``esper-fast train --nproc``
    before it launches the processes): RunDirError if the run could not start or resume in
    ``out``. Takes the lock for the moment of the check."""
    if resume and not os.path.isdir(out):
        raise RunDirError(f"--resume {out}: no such run folder")
    run_dir = RunDir(out, warn=warn)
    run_dir.acquire("esper-fast train: checking the folder before starting the processes")
    try:
        _check_contents(run_dir, out, out if resume else None, overwrite)
    finally:
        run_dir.release()


def _open(run_dir: RunDir, config, resume, overrides, overwrite, command) -> dict:
    """Rank 0's start: takes the folder's lock, checks what it holds and reads the checkpoint
    to resume from. What every rank needs to start, as plain data."""
    out = resume if resume is not None else config.out
    if resume is not None and not os.path.isdir(resume):
        raise RunDirError(f"--resume {resume}: no such run folder")
    run_dir.acquire(command)
    contents = _check_contents(run_dir, out, resume, overwrite)
    opened = {"config": config, "checkpoint": None, "path": None, "status": contents.status,
              "clear": contents.kind != "empty"}
    if resume is not None:
        run_dir.remove_stale_temporaries()
        run_dir.continue_status(contents.status)
        payload, path = run_dir.load_checkpoint(stranger=_stranger_to(_folder_identity(run_dir)))
        state = Checkpoint.from_payload(payload, path)
        config = dataclasses.replace(RunConfig(**state.config), out=out, **(overrides or {}))
        try:
            check_device(config.device)  # the run's own device, when no --device was given
            check_trainable(config, get_task_spec(config.task).topology)
        except SettingsError as exc:
            raise RunDirError(str(exc)) from None
        opened.update(config=config, checkpoint=state, path=path)
    return opened


def _folder_identity(run_dir: RunDir) -> dict | None:
    """The identity of the run a folder holds (:meth:`ConfigRecord.identity`) from its log's
    first record, or, without a readable log, the start in its ``run.json``; None when
    neither says."""
    try:
        first = read_log(run_dir.path / METRICS_FILE)[:1]
    except OSError:
        first = []
    if first and first[0].get("type") == ConfigRecord.TYPE:
        return ConfigRecord.from_log(first[0]).identity()
    started = (read_status(run_dir.path) or {}).get("started_at")
    return {"started_at": started} if started else None


def _stranger_to(own: dict | None):
    """For :meth:`RunDir.load_checkpoint`: why a checkpoint's payload is not of the run whose
    identity is ``own`` (its log's config record says who it is), or None."""

    def stranger(payload) -> str | None:
        try:
            theirs = ConfigRecord.from_log(payload["log"][0]).identity()
        except (TypeError, KeyError, IndexError, AttributeError):
            return None  # not a checkpoint at all: Checkpoint.from_payload says so
        differ = [key for key in own if own[key] != theirs[key]] if own is not None else []
        if not differ:
            return None
        if "started_at" in differ:
            return f"one started at {theirs['started_at']}, this folder's at {own['started_at']}"
        return f"the same start, another {'settings' if 'settings' in differ else 'data'}"

    return stranger


def _open_on_every_rank(ranks: Ranks, run_dir, config, resume, overrides, overwrite, command) -> dict:
    """:func:`_open` on rank 0, its result (or its error) broadcast to every rank."""
    if not ranks.distributed:
        return _open(run_dir, config, resume, overrides, overwrite, command)
    if ranks.is_writer:
        try:
            opened = _open(run_dir, config, resume, overrides, overwrite, command)
        except BaseException as exc:
            ranks.broadcast({"error": str(exc), "kind": type(exc).__name__, "refused": isinstance(exc, RunDirError)})
            raise
        ranks.broadcast(opened)
        return opened
    opened = ranks.broadcast(None)
    if "error" in opened:
        if opened["refused"]:
            raise RunDirError(opened["error"])
        raise RuntimeError(f"rank 0 could not start the run ({opened['kind']}: {opened['error']})")
    return opened


def _silent(line: str) -> None:
    pass


def _write_status_if_possible(run_dir, **fields) -> None:
    """``run.json`` on the way out of a run that failed: the disk that failed it may refuse
    this write too, and the run's own error is the one to report."""
    try:
        run_dir.write_status(**fields)
    except RunWriteError:
        pass


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
    plot), 1 when a checkpoint, ``run.json`` or ``metrics.jsonl`` could not be written (after
    one line naming the file, the cause and how to resume; the last checkpoint and the log
    are left as they were).

    A new run takes ``config``; ``resume`` continues the run in that folder from its newest
    checkpoint, with its own settings (``overrides`` may change those of
    :data:`RESUME_OVERRIDES`). User mistakes raise :class:`RunDirError` or
    :class:`esper_fast.train.datasets.DataError` before the folder is changed.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process calls this; they form one
    data-parallel run (see :mod:`esper_fast.train.loop`), rank 0 writes and prints, the
    other ranks are silent (their stdout goes to ``/dev/null``; errors still reach stderr).
    """
    out = resume if resume is not None else config.out
    ranks = Ranks.from_env()
    writer = ranks.is_writer
    run_dir = RunDir(out, warn=warn) if writer else SilentRunDir(out)
    run = None
    clean = False
    try:
        with StopSignals() as stop, contextlib.ExitStack() as quiet:
            if not writer:
                quiet.enter_context(contextlib.redirect_stdout(quiet.enter_context(open(os.devnull, "w"))))
            opened = _open_on_every_rank(ranks, run_dir, config, resume, overrides, overwrite, command)
            config = opened["config"]
            run_dir.keep = config.keep_checkpoints
            config = resolve(config, get_task_spec(config.task).block_size)
            run = LifecycleRun(config, run_dir, stop, echo=say if writer else _silent, ranks=ranks)
            if resume is not None:
                run.resume_from(opened["checkpoint"], opened["path"], command, opened["status"])
            else:
                if opened["clear"]:
                    run_dir.clear()
                run.start(command)
            summary = run.execute()
            if summary["status"] == "interrupted" and writer:
                # Said before the ranks part: once rank 0 is done, torchrun ends the others.
                warn(f"esper-fast: stopped by {stop.name} "
                     + where_stopped(*run.stopped_at, config.epochs, run.steps_per_epoch)
                     + (f" (checkpoint {run.checkpoint_path})" if run.checkpoint_path else "")
                     + f"; continue with: {resume_command(out)}")
        clean = True
    except ForcedStop as stopped:
        if run is not None:
            _write_status_if_possible(run_dir, status="interrupted", stopped_by=str(stopped))
        last = run.checkpoint_path if run is not None else None
        if writer:
            warn(f"esper-fast: stopped at once by a second {stopped}; "
                 + (f"the last checkpoint is {last}; continue with: {resume_command(out)}" if last else "nothing was saved"))
        return 128 + stopped.signum
    except RunWriteError as exc:
        _write_status_if_possible(run_dir, status="failed", error=f"{type(exc).__name__}: {exc}")
        last = run.checkpoint_path if run is not None else None
        warn(f"esper-fast: error: {exc}; the run stopped, "
             + (f"its last checkpoint is {last}; continue with: {resume_command(out)}" if last
                else "with no checkpoint to resume from; start it again with --overwrite"))
        return EXIT_WRITE_FAILED
    except BaseException as exc:
        if run is not None and not isinstance(exc, (RunDirError,)):
            _write_status_if_possible(run_dir, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        run_dir.release()
        ranks.close(clean)
    return stop.exit_code if summary["status"] == "interrupted" else 0
