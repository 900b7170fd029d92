"""Clean stops: SIGINT and SIGTERM ask the run to stop after the current training step.

While :class:`StopSignals` is installed, the first SIGINT or SIGTERM only records the
request; the epoch loop sees it before drawing the next batch, writes a checkpoint, the
summary and the plot, and the command exits 130 (SIGINT) or 143 (SIGTERM). A second signal
stops at once (:class:`ForcedStop`), leaving the last checkpoint as it was.

Test hook: ``ESPER_FAST_SELF_SIGNAL=SIGTERM@3:1`` makes the run send itself SIGTERM after
step 1 of epoch 3 (step 0: as epoch 3 begins), so tests can interrupt a run at an exact
place. Any signal name works, SIGKILL included (a crash with no clean-up).

In a run of several processes the ranks agree on a stop before each step
(:mod:`esper_fast.train.loop`): a rank that was not signalled itself :meth:`adopts
<StopSignals.adopt>` the stop of another, and its own signal, if it comes later, is then
still the first one it got, not a second.
"""

from __future__ import annotations

import os
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SELF_SIGNAL_ENV = "ESPER_FAST_SELF_SIGNAL"


class ForcedStop(KeyboardInterrupt):
    """A second stop signal: the run ends at once."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """Context manager: SIGINT/SIGTERM become a stop request (see the module docstring)."""

    def __init__(self):
        self.signum: int | None = None
        self._adopted = False  # signum is another rank's request, not a signal this process got
        self._previous: dict = {}
        self._self_signal = _parse_self_signal(os.environ.get(SELF_SIGNAL_ENV))

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process ended by it."""
        return 128 + int(self.signum)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and not self._adopted:
            raise ForcedStop(signum)
        if self.signum is None:
            self.signum = signum
        self._adopted = False

    def adopt(self, signum: int) -> None:
        """Another process of the run was asked to stop by ``signum``: stop here too."""
        if self.signum is None:
            self.signum, self._adopted = signum, True

    def __enter__(self) -> "StopSignals":
        # Signal handlers can only be set from the main thread; elsewhere stops are not caught.
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def at_step(self, epoch: int, steps_done: int) -> bool:
        """Called before each training batch is drawn; True when the run should stop now."""
        if self._self_signal is not None and self._self_signal[1:] == (epoch, steps_done):
            os.kill(os.getpid(), self._self_signal[0])
        return self.requested


def _parse_self_signal(text: str | None):
    if not text:
        return None
    try:
        name, place = text.split("@")
        epoch, step = place.split(":")
        return int(getattr(signal, name.upper())), int(epoch), int(step)
    except (ValueError, AttributeError):
        raise ValueError(f"{SELF_SIGNAL_ENV} must look like SIGTERM@EPOCH:STEP, got {text!r}") from None
