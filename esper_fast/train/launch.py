"""``esper-fast train --nproc N``: the run on N processes of this machine, launched through
``torchrun --standalone``, and shown as a run of one process shows itself.

The user sees what rank 0 prints and nothing else: its stdout (the epoch lines) and its
stderr (progress bars, warnings, the one line a stop or a failure ends with) reach the
terminal, while torchrun's own output and the other ranks' stderr (the tracebacks torchrun
and gloo print when a rank stops or fails) go to :data:`PROCESS_LOG` in the run folder,
kept only when something was written there. Rank 0's stderr gets past torchrun through a
named pipe (:data:`CONSOLE_ENV`) that the launcher relays to its own stderr. The exit status
is a single process's: 128 + the signal of a clean stop, 1 for a write failure.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from esper_fast.train.ranks import launched_rank
from esper_fast.train.run_dir import read_status

# How the launcher tells the processes the command it was given (the log records it as typed).
LAUNCH_COMMAND_ENV = "ESPER_FAST_LAUNCH_COMMAND"
# The named pipe rank 0 writes its stderr to, relayed by the launcher to the terminal.
CONSOLE_ENV = "ESPER_FAST_CONSOLE"
# Where torchrun's output and the other ranks' stderr go, in the run folder.
PROCESS_LOG = "processes.log"


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command ``esper-fast train --nproc N ...`` runs: N processes on this machine
    (``--standalone``: a local rendezvous, no network set-up), each ``python -m esper_fast``
    with the same arguments but --nproc (torchrun would take it for an abbreviation of its own
    --nproc-per-node)."""
    workers, value_next = [], False
    for token in argv:
        if value_next:
            value_next = False
            continue
        name = token.split("=", 1)[0]
        if len(name) > 3 and "--nproc".startswith(name):  # --nproc, or a prefix argparse took for it
            value_next = "=" not in token
            continue
        workers.append(token)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "esper_fast", *workers]


def launch(nproc: int, argv: list[str], out: str) -> int:
    """Runs :func:`torchrun_command` and returns the run's exit status (see the module
    docstring). SIGINT and SIGTERM are passed on to torchrun once (it passes them to every
    rank, which stop after the same step). ``out``: the run folder (it exists: the launcher
    checked it)."""
    env = dict(os.environ)
    env[LAUNCH_COMMAND_ENV] = shlex.join(["esper-fast", *argv])
    # One process per core share, as torchrun would set (and warn about) otherwise.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    log_path = Path(out) / PROCESS_LOG
    forwarded: list[int] = []
    with tempfile.TemporaryDirectory(prefix="esper-fast-") as folder:
        console = os.path.join(folder, "console")
        os.mkfifo(console, 0o600)
        env[CONSOLE_ENV] = console
        relay = threading.Thread(target=_relay, args=(console,), daemon=True)
        relay.start()
        with open(log_path, "ab") as log:
            # torchrun in its own session: a terminal's Ctrl-C reaches it once, through us.
            child = subprocess.Popen(torchrun_command(nproc, argv), env=env, start_new_session=True,
                                     stderr=log)

            def forward(signum, frame):
                if not forwarded:
                    forwarded.append(signum)
                    child.send_signal(signum)

            previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                code = child.wait()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        _end_relay(console)
        relay.join(timeout=10)
    try:
        if log_path.stat().st_size == 0:
            log_path.unlink()
    except OSError:
        pass
    if forwarded:
        return 128 + forwarded[0]
    return _stopped_by_signal(out) or code


def _relay(console: str) -> None:
    """Copies what rank 0 writes to ``console`` to this process's stderr, as it comes."""
    with open(console, "rb", buffering=0) as pipe:
        while chunk := pipe.read(65536):
            try:
                os.write(sys.__stderr__.fileno(), chunk)
            except (OSError, ValueError):  # a closed terminal: keep draining the pipe
                pass


def _end_relay(console: str) -> None:
    """Ends :func:`_relay` if no rank ever opened the pipe (it waits for a writer)."""
    try:
        os.close(os.open(console, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader left: the relay has ended
        pass


def attach_console() -> None:
    """In rank 0 of a launched run, points stderr at the launcher's console pipe; elsewhere
    does nothing."""
    console = os.environ.pop(CONSOLE_ENV, None)
    if console is None or launched_rank() != 0:
        return
    sys.stderr.flush()
    fd = os.open(console, os.O_WRONLY)
    os.dup2(fd, 2)
    os.close(fd)


def _stopped_by_signal(out: str) -> int | None:
    """128 + the signal that stopped the run in ``out`` cleanly (its run.json), else None."""
    status = read_status(out) or {}
    try:
        if status.get("status") == "interrupted":
            return 128 + int(getattr(signal, status["stopped_by"]))
    except (KeyError, TypeError, AttributeError):
        pass
    return None
