"""The terminal a run writes to, made safe to lose: a closed pipe (``| head``, a dropped
ssh session) must never end a run.

:func:`pipe_safe_streams` wraps ``sys.stdout`` and ``sys.stderr`` for the duration of a
command. When a write finds the reader gone, the stream's file descriptor is pointed at
``/dev/null`` and everything after it (our lines, the governor's prints, tqdm, the
interpreter's final flush) is dropped quietly while the run carries on.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys


class PipeSafeStream(io.TextIOBase):
    """A text stream that turns a broken pipe into silence instead of an exception."""

    def __init__(self, stream):
        self._stream = stream
        self.lost = False

    def _lose(self) -> None:
        # Keep the descriptor open but harmless, so later writes and the interpreter's
        # flush at exit do not raise again.
        self.lost = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, io.UnsupportedOperation):
            pass

    def write(self, text: str) -> int:
        if not self.lost:
            try:
                self._stream.write(text)
            except (BrokenPipeError, ConnectionResetError):
                self._lose()
            except ValueError:  # the stream was closed under us
                self.lost = True
        return len(text)

    def flush(self) -> None:
        if not self.lost:
            try:
                self._stream.flush()
            except (BrokenPipeError, ConnectionResetError):
                self._lose()
            except ValueError:
                self.lost = True

    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        try:
            return self._stream.isatty()
        except ValueError:
            return False

    def writable(self) -> bool:
        return True

    @property
    def encoding(self):
        return getattr(self._stream, "encoding", "utf-8")


@contextlib.contextmanager
def pipe_safe_streams():
    """Within the block, ``sys.stdout``/``sys.stderr`` survive their reader going away."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = PipeSafeStream(sys.stdout), PipeSafeStream(sys.stderr)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = saved


def say(line: str) -> None:
    """One line on stdout, flushed (a log reader sees each epoch as it ends)."""
    print(line, flush=True)


def warn(line: str) -> None:
    """One line on stderr."""
    print(line, file=sys.stderr, flush=True)
