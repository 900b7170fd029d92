"""What watches each training step without slowing it down: the loss recorder the governor
reads once per epoch, the batch iterator that carries the per-step hooks and honours a stop
request, the kernel tally and the progress bar.

Per-step governor checks without per-step syncs: the training criterion is wrapped by
:class:`LossWatch`, which copies each step's loss into a device buffer. After the epoch the
buffer is read once and every step's loss goes through ``check_vital_signs`` in order.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import math
import time
from typing import Callable, Iterable

import torch


class LossWatch:
    """Criterion wrapper that records every step's loss on the device without syncing.

    ``poison_step`` (0-based, within the current epoch) multiplies that step's loss by NaN:
    the governor demo's injected failure. Backward then fills the gradients with NaN, as a
    real divergence would.
    """

    def __init__(self, criterion: Callable, device: str):
        self.criterion = criterion
        self.device = torch.device(device)
        self.losses = torch.empty(0, device=self.device)
        self.step = 0
        self.poison_step: int | None = None

    def begin_epoch(self, expected_steps: int, poison_step: int | None = None) -> None:
        if self.losses.numel() < expected_steps:
            self.losses = torch.empty(expected_steps, device=self.device)
        self.step = 0
        self.poison_step = poison_step

    def resume_epoch(self, expected_steps: int, poison_step: int | None, done: torch.Tensor) -> None:
        """Continues an epoch whose first ``len(done)`` steps recorded the losses ``done``."""
        self.begin_epoch(max(expected_steps, done.numel()), poison_step)
        self.losses[: done.numel()] = done.to(self.losses)
        self.step = done.numel()

    def __call__(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = self.criterion(outputs, labels)
        if self.step == self.poison_step:
            loss = loss * float("nan")
        if self.step >= self.losses.numel():
            self.losses = torch.cat([self.losses, torch.empty(max(16, self.step), device=self.device)])
        self.losses[self.step] = loss.detach()
        self.step += 1
        return loss

    def last_loss(self) -> float:
        """The latest step's loss (one device read)."""
        return float(self.losses[self.step - 1]) if self.step else math.nan

    def done_losses(self) -> torch.Tensor:
        """The losses of the steps done so far this epoch, on the CPU (one device read)."""
        return self.losses[: self.step].detach().cpu().clone()

    def epoch_losses(self) -> list[float]:
        """Every step's loss of the epoch, read from the device once."""
        return self.losses[: self.step].tolist()


class Batches:
    """An iterable over at most ``limit`` batches of ``source`` that keeps ``len()``.

    For the training loop: ``skip`` batches are drawn and dropped first (a resumed epoch
    continues where it stopped), then ``after_skip()`` runs; before batch ``i`` is drawn
    ``should_stop()`` may end the epoch early (a clean stop after the current step), and
    before it is handed out ``before_batch(i)`` runs (alpha ramp, kernel tracing).
    """

    def __init__(
        self,
        source: Iterable,
        limit: int | None = None,
        before_batch: Callable[[int], None] | None = None,
        *,
        skip: int = 0,
        after_skip: Callable[[], None] | None = None,
        should_stop: Callable[[int], bool] | None = None,
    ):
        self.source = source
        self.limit = limit
        self.before_batch = before_batch
        self.skip = skip
        self.after_skip = after_skip
        self.should_stop = should_stop

    def __len__(self) -> int:
        n = len(self.source)
        return n if self.limit is None else min(n, self.limit)

    def __iter__(self):
        batches = iter(self.source)
        for _ in itertools.islice(batches, self.skip):
            pass
        if self.after_skip is not None:
            self.after_skip()
        for i in range(self.skip, len(self)):
            if self.should_stop is not None and self.should_stop(i):
                return
            batch = next(batches, None)
            if batch is None:
                return
            if self.before_batch is not None:
                self.before_batch(i)
            yield batch


class KernelTally:
    """Counts the ``esper_fast::*`` operators dispatched while tracing.

    The run traces one training step, one validation batch and the snapshot per epoch, so
    the summary can say which kernels ran without slowing every step down. Disabled under
    ``--compile`` (a dispatch mode would get in the compiler's way).
    """

    def __init__(self, enabled: bool = True):
        from torch.utils._python_dispatch import TorchDispatchMode

        counts = self.counts = collections.Counter()

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.namespace == "esper_fast":
                    counts[func.name().split("::")[-1].split(".")[0]] += 1
                return func(*args, **(kwargs or {}))

        self.enabled = enabled
        self._mode_type = _Mode
        self._mode = None

    def start(self) -> None:
        if self.enabled and self._mode is None:
            self._mode = self._mode_type()
            self._mode.__enter__()

    def stop(self) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)

    @contextlib.contextmanager
    def tracing(self, start: bool = True):
        """Traces the block (``start=False``: only makes sure tracing has ended after it)."""
        if start:
            self.start()
        try:
            yield
        finally:
            self.stop()

    def first_batch_only(self, i: int) -> None:
        """A ``before_batch`` hook: trace batch 0 (forward, backward, step), stop at batch 1.
        Wrap the loop in :meth:`tracing` too, so tracing ends even if the loop raises."""
        if i == 0:
            self.start()
        else:
            self.stop()


class Progress:
    """tqdm over the epoch's batches: batch count, loss (read every ``refresh`` steps) and
    samples per second. Reading the loss syncs, so it happens only every ``refresh`` steps.
    ``initial``: batches already done (a resumed epoch)."""

    def __init__(self, batches, watch: LossWatch, desc: str, enabled: bool, refresh: int = 10, initial: int = 0):
        self.batches = batches
        self.watch = watch
        self.desc = desc
        self.enabled = enabled
        self.refresh = refresh
        self.initial = initial

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        if not self.enabled:
            yield from self.batches
            return
        from tqdm import tqdm

        samples = 0
        start = time.perf_counter()
        total = len(self.batches)
        with tqdm(total=total, initial=self.initial, desc=self.desc, unit="batch", leave=False, dynamic_ncols=True) as bar:
            for i, batch in enumerate(self.batches, start=self.initial):
                yield batch
                samples += batch[1].shape[0]
                if i % self.refresh == 0 or i == total - 1:
                    rate = samples / max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix(loss=f"{self.watch.last_loss():.3f}", samples_per_s=f"{rate:,.0f}", refresh=False)
                bar.update(1)
