"""Where a run writes: the run folder, its lock, status, log, checkpoints and plot.

    <out>/
      .lock            held (flock) for the run's life; names the process holding it
      run.json         status: running | interrupted | finished | failed, and where it stands
      metrics.jsonl    one JSON record per line: config, epoch..., resume/stop, summary
      metrics.png      the plot
      processes.log    a run of several processes: what torchrun and ranks other than 0 printed
                       (kept only when they printed something)
      checkpoints/     epoch-0003.pt (3 epochs done), epoch-0003-step-0002.pt (and 2 steps
                       of the 4th); the newest ``keep`` are kept

A run owns its folder: the lock is taken before anything is read or written, and a second
run into the same folder fails at once. A folder holding a run is never written over unless
the run is resumed or ``--overwrite`` is given. Every write is whole: a log record is one
``write()`` of one complete line, flushed and synced; ``run.json``, the plot and checkpoints
go to a temporary file that is then renamed over the old one, so a crash at any moment
leaves the previous version readable.

Every file a run writes goes through :class:`RunDir`: the one place a distributed run's
rank 0 writes; the other ranks hold a :class:`SilentRunDir`, which writes nothing. If the
folder disappears mid-run it is made again, the log rewritten from memory, and the run
carries on. A checkpoint, ``run.json`` or ``metrics.jsonl`` that cannot be written (a full
disk, a read-only folder) raises :class:`RunWriteError`, which names the file and the cause:
the run stops, and the last whole checkpoint and the log are left as they were, to resume
from. A plot that cannot be written is reported once and the run carries on.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Callable

LOCK_FILE = ".lock"
STATUS_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"
CHECKPOINT_DIR = "checkpoints"
_CHECKPOINT_NAME = re.compile(r"^epoch-(\d{4,})(?:-step-(\d{4,}))?\.pt$")
_OWN_FILES = (STATUS_FILE, METRICS_FILE, PLOT_FILE, CHECKPOINT_DIR)
# What ended a run that left no stop signal, by the status it left in run.json.
STOPPED_BY = {"running": "a crash", "failed": "an error"}
# Below this much free space (or the size of the newest checkpoint, if larger) a failed write
# whose error says nothing of its cause is put down to a full disk.
_LOW_SPACE = 1 << 20


class RunDirError(Exception):
    """The folder cannot be used as asked; the message says why in one line."""


class RunWriteError(Exception):
    """A file the run needs to resume (a checkpoint, ``run.json``, ``metrics.jsonl``) could
    not be written; the message names it and the cause in one line."""

    def __init__(self, path: Path, cause: str):
        super().__init__(f"could not write {path} ({cause})")
        self.path, self.cause = path, cause


def now_iso() -> str:
    """The wall-clock time, UTC, ISO 8601 (what the log's timestamps are)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def jsonable(value):
    """``value`` with NaN as ``None`` and infinities as ``"inf"``/``"-inf"`` (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def _size(num_bytes: int) -> str:
    if num_bytes < 1024:
        return f"{num_bytes} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        num_bytes /= 1024
        if num_bytes < 1024 or unit == "TiB":
            return f"{num_bytes:.1f} {unit}"


def checkpoint_name(epochs_done: int, steps_done: int = 0) -> str:
    return f"epoch-{epochs_done:04d}.pt" if steps_done == 0 else f"epoch-{epochs_done:04d}-step-{steps_done:04d}.pt"


def read_log(path: str | Path) -> list[dict]:
    """The records of a metrics log; a line that is not whole JSON (a crash mid-write) is skipped."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def resume_command(folder: str | Path) -> str:
    """The command that continues the run in ``folder``, whatever its number of processes
    (``--resume`` takes as many as the run started with): what every message and the
    summary show."""
    return f"esper-fast train --resume {folder}"


def read_status(folder: str | Path) -> dict | None:
    """The ``run.json`` of the run in ``folder``; None when there is none or it is not whole JSON."""
    try:
        status = json.loads((Path(folder) / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable) -> None:
    """Writes ``path`` through ``write(binary_handle)`` into a temporary file beside it, then
    renames it over ``path``: readers see the old file or the new one, never a part."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            temporary.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


@dataclasses.dataclass
class Contents:
    """What a folder holds, as far as runs go."""

    kind: str                 # "empty", "finished", "unfinished" (has a checkpoint), "log-only"
    status: dict | None       # run.json, when readable
    checkpoints: list[Path]   # oldest first

    def describe(self) -> str:
        status = self.status or {}
        done, total = status.get("epochs_done"), status.get("epochs")
        if self.kind == "finished":
            return f"a finished run ({status.get('task', '?')}, {done} epochs, finished {status.get('updated_at', '?')})"
        if self.kind == "unfinished":
            where = f"after epoch {done} of {total}" if done is not None else "before its end"
            how = status.get("stopped_by") or STOPPED_BY.get(status.get("status"), "an unknown cause")
            return f"an unfinished run (stopped {where} by {how})"
        return "the log of an earlier run"


class RunDir:
    """A run's folder. :meth:`acquire` takes the lock; then the run writes through
    :meth:`start_log`, :meth:`append`, :meth:`write_status`, :meth:`save_checkpoint` and
    :meth:`write_plot`; :meth:`release` at the end (the lock also goes with the process)."""

    def __init__(self, path: str | Path, warn: Callable[[str], None] = print, keep: int = 2):
        self.path = Path(path)
        self.warn = warn
        self.keep = keep
        self._lock_fd: int | None = None
        self._lock_id: tuple | None = None
        self._log_fd: int | None = None
        self._lines: list[bytes] = []   # the whole log, to rewrite it if the folder vanishes
        self._status: dict = {}
        self._warned: set[str] = set()

    # ---------------------------------------------------------------- lock
    def acquire(self, command: str = "") -> None:
        """Creates the folder if need be and takes its lock; :class:`RunDirError` if another
        process holds it or the folder cannot be written."""
        import fcntl

        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunDirError(f"--out {self.path} is not a writable folder ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise RunDirError(
                f"{self.path} is in use by another run ({holder}); wait for it to end or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}: {command}\n".encode(), 0)
        self._lock_fd = fd
        stat = os.fstat(fd)
        self._lock_id = (stat.st_dev, stat.st_ino)

    def release(self) -> None:
        for name in ("_log_fd", "_lock_fd"):
            fd = getattr(self, name)
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
                setattr(self, name, None)

    # ---------------------------------------------------------------- what is there
    def contents(self) -> Contents:
        checkpoints = self.checkpoints()
        status = read_status(self.path)
        names = {p.name for p in self.path.iterdir()} if self.path.is_dir() else set()
        if status is not None and status.get("status") == "finished":
            kind = "finished"
        elif checkpoints:
            kind = "unfinished"
        elif names & {STATUS_FILE, METRICS_FILE, PLOT_FILE}:
            kind = "log-only"
        else:
            kind = "empty"
        return Contents(kind, status, checkpoints)

    def checkpoints(self) -> list[Path]:
        """The checkpoint files, oldest first."""
        folder = self.path / CHECKPOINT_DIR
        found = []
        if folder.is_dir():
            for path in folder.iterdir():
                match = _CHECKPOINT_NAME.match(path.name)
                if match:
                    found.append(((int(match[1]), int(match[2] or 0)), path))
        return [path for _, path in sorted(found)]

    def clear(self) -> None:
        """Removes the files a run writes (``--overwrite``); anything else in the folder stays."""
        for name in _OWN_FILES:
            target = self.path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()

    def load_checkpoint(self, stranger: Callable[[dict], str | None] | None = None) -> tuple[dict, Path]:
        """The newest checkpoint that loads (``weights_only``) and is the folder's own; an
        unreadable one is reported and the one before it tried. ``stranger(payload)``: why
        a checkpoint belongs to another run (None: it is this folder's). A stranger is left
        as it is and skipped (said once, when an older checkpoint of the run's own is
        found); with nothing of its own, :class:`RunDirError` says so in one line."""
        import torch

        skipped = None
        for path in reversed(self.checkpoints()):
            try:
                payload = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # a damaged file: fall back to the previous checkpoint
                reason = (str(exc).strip().splitlines() or [""])[0]
                self.warn(f"warning: checkpoint {path} cannot be read ({type(exc).__name__}: {reason}); trying the one before")
                continue
            why = stranger(payload) if stranger is not None else None
            if why is None:
                if skipped is not None:
                    self.warn(f"warning: {skipped[0]} is a checkpoint of another run ({skipped[1]}): skipped it, "
                              f"resuming from {path}")
                return payload, path
            skipped = skipped or (path, why)
        if skipped is not None:
            raise RunDirError(f"{skipped[0]} is a checkpoint of another run ({skipped[1]}), and {self.path} holds "
                              "no checkpoint of its own run to resume from")
        raise RunDirError(f"no readable checkpoint in {self.path / CHECKPOINT_DIR}")

    # ---------------------------------------------------------------- writing
    def _moved(self) -> bool:
        """True when the folder (with the lock file) is gone or was replaced."""
        try:
            stat = os.stat(self.path / LOCK_FILE)
        except OSError:
            return True
        return (stat.st_dev, stat.st_ino) != self._lock_id

    def _recreate(self) -> None:
        self.warn(f"warning: {self.path} disappeared during the run; made it again and rewrote {METRICS_FILE} "
                  "(checkpoints resume with the next one)")
        self.release()
        self.acquire(self._status.get("command", ""))
        self._open_log(self._lines)
        self._write_status_file()

    def _guarded(self, target: Path, write: Callable[[], object], required: bool = True):
        """Runs ``write`` (which writes ``target``); if the folder vanished, makes it again and
        retries once. Any other failure raises :class:`RunWriteError`, or, for a file the run
        does not need to resume (``required=False``: the plot), is reported once and the run
        goes on."""
        try:
            if self._moved():
                self._recreate()
            return write()
        except RunDirError:
            raise
        except OSError as first:
            try:
                if self._moved():
                    self._recreate()
                    return write()
            except OSError as exc:
                first = exc
            cause = self._failure_cause(first)
            if required:
                raise RunWriteError(target, cause) from first
            if target.name not in self._warned:
                self._warned.add(target.name)
                self.warn(f"warning: could not write {target} ({cause}); the run goes on")
            return None

    def _failure_cause(self, error: OSError) -> str:
        """Why a write failed, in a few words: the system's reason when the error carries
        one, else (torch's writer reports a short write without one) the free space."""
        if error.strerror:
            return error.strerror
        message = (str(error).strip().splitlines() or [type(error).__name__])[0]
        try:
            free = shutil.disk_usage(self.path).free
            checkpoints = self.checkpoints()
            needed = max(_LOW_SPACE, checkpoints[-1].stat().st_size if checkpoints else 0)
        except OSError:
            return message
        if free < needed:
            return f"no space left on the device: {_size(free)} free"
        return f"{message}; {_size(free)} free on the device"

    def _open_log(self, lines: list[bytes]) -> None:
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None
        path = self.path / METRICS_FILE
        atomic_write(path, lambda handle: handle.writelines(lines))
        self._log_fd = os.open(path, os.O_WRONLY | os.O_APPEND)

    def start_log(self, records: list[dict]) -> None:
        """Writes the log afresh with ``records`` (a new run's config, or a resumed run's
        records so far), then keeps it open for :meth:`append`."""
        self._lines = [self._line(r) for r in records]
        self._guarded(self.path / METRICS_FILE, lambda: self._open_log(self._lines))

    @staticmethod
    def _line(record: dict) -> bytes:
        return (json.dumps(jsonable(record)) + "\n").encode("utf-8")

    def append(self, record: dict) -> None:
        """One record as one whole line, synced to disk."""
        line = self._line(record)

        def write():
            if self._log_fd is None:
                self._open_log(self._lines)
            view = memoryview(line)
            while view:
                view = view[os.write(self._log_fd, view):]
            os.fsync(self._log_fd)

        # The line joins the in-memory log after the write, so that a folder made again
        # during this write (which rewrites the log from memory) does not get it twice.
        self._guarded(self.path / METRICS_FILE, write)
        self._lines.append(line)

    def continue_status(self, status: dict | None) -> None:
        """A resumed run's status starts from ``status`` (what ``run.json`` held), so that its
        updates keep what an earlier process wrote: the task, the planned epochs, the start,
        the world size. The earlier process's ``error`` is dropped (the log's resume record
        says how it ended)."""
        self._status = {k: v for k, v in (status or {}).items() if k != "error"}

    def write_status(self, **fields) -> None:
        """Updates ``run.json`` (status, position, last checkpoint...): ``fields`` replace
        theirs, the others keep the values this run gave them."""
        self._status.update(fields, updated_at=now_iso())
        self._guarded(self.path / STATUS_FILE, self._write_status_file)

    def _write_status_file(self) -> None:
        data = (json.dumps(jsonable(self._status), indent=1) + "\n").encode("utf-8")
        atomic_write(self.path / STATUS_FILE, lambda handle: handle.write(data))

    def save_checkpoint(self, payload: dict, epochs_done: int, steps_done: int = 0) -> Path:
        """Writes ``payload`` with ``torch.save`` atomically and keeps the newest ``keep``
        checkpoints; returns its path. :class:`RunWriteError` if it could not be written
        (the checkpoints before it are kept)."""
        import torch

        def save(handle):
            try:
                torch.save(payload, handle)
            except RuntimeError as exc:
                # torch's zip writer reports a short write (a full disk) as a RuntimeError.
                raise OSError((str(exc).strip().splitlines() or ["torch.save failed"])[0]) from exc

        path = self.path / CHECKPOINT_DIR / checkpoint_name(epochs_done, steps_done)

        def write():
            path.parent.mkdir(exist_ok=True)
            atomic_write(path, save)
            for old in self.checkpoints()[: -self.keep]:
                if old != path:
                    old.unlink()
            return path

        return self._guarded(path, write)

    def remove_stale_temporaries(self) -> None:
        """Deletes what an earlier process killed mid-write left (its temporary files)."""
        for folder in (self.path, self.path / CHECKPOINT_DIR):
            if folder.is_dir():
                for path in folder.glob(".*.tmp"):
                    try:
                        path.unlink()
                    except OSError:
                        pass

    def write_plot(self, draw: Callable[[Path], object]) -> Path | None:
        """``draw(path)`` into a temporary PNG, renamed to ``metrics.png``."""
        target = self.path / PLOT_FILE

        def write():
            temporary = self.path / f".{PLOT_FILE}.{os.getpid()}.tmp"
            try:
                draw(temporary)
                os.replace(temporary, target)
            finally:
                if temporary.exists():
                    temporary.unlink()
            return target

        return self._guarded(target, write, required=False)


class SilentRunDir:
    """The run folder as the ranks other than 0 of a distributed run hold it: the methods of
    :class:`RunDir` that write, doing nothing. They take no lock and never touch the folder
    (rank 0 reads a checkpoint to resume from and broadcasts it)."""

    def __init__(self, path: str | Path, keep: int = 2):
        self.path = Path(path)
        self.keep = keep

    def acquire(self, command: str = "") -> None:
        pass

    def release(self) -> None:
        pass

    def clear(self) -> None:
        pass

    def start_log(self, records: list[dict]) -> None:
        pass

    def append(self, record: dict) -> None:
        pass

    def continue_status(self, status: dict | None) -> None:
        pass

    def write_status(self, **fields) -> None:
        pass

    def save_checkpoint(self, payload: dict, epochs_done: int, steps_done: int = 0) -> None:
        return None

    def write_plot(self, draw: Callable[[Path], object]) -> None:
        return None
