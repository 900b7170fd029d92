"""The terminal a run writes to: what an epoch prints, where a stopped run stands, and
streams made safe to lose, since a closed pipe (``| head``, a dropped ssh session) must
never end a run.

:func:`epoch_lines` gives an epoch's lines: one line in a run of one slot; in a run of
several, a head line, then a line per slot (its seed, stage, alpha and Shapley value, each
named) and the slot's events indented under it, so that every line fits
:data:`COLUMNS` columns whatever the number of slots.

:func:`pipe_safe_streams` wraps ``sys.stdout`` and ``sys.stderr`` for the duration of a
command. When a write finds the reader gone, the stream's file descriptor is pointed at
``/dev/null`` and everything after it (our lines, the governor's prints, tqdm, the
interpreter's final flush) is dropped quietly while the run carries on.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import textwrap
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from esper_fast.train.report import EpochRecord

# The width the lines of a run of several slots keep to (a run of one slot prints one line
# per epoch, as it always has).
COLUMNS = 100
SLOT_INDENT = "  "
EVENT_INDENT = "      "


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


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def epoch_lines(record: "EpochRecord", epochs: int, task_type: str) -> list[str]:
    """The epoch's console lines.

    One slot: one line, ``epoch | loss | val (train) | stage | alpha | contribution | time``
    (for ``lm``: ``ppl`` for ``val`` and ``loss drop V nats`` for the contribution) and the
    epoch's events after it; while candidates incubate (and at their judgement) the events
    go on indented lines of their own instead.

    Several slots: the head line ``epoch | loss | val (train) | time``; the events that
    belong to no slot (a governor rollback) indented under it; then per slot, in the host's
    order, ``SLOT  SEED  STAGE  alpha A  Shapley value V points`` (the stage the epoch
    trained in, alpha at its end, the seed's accuracy Shapley value with ``+/-`` its 95%
    bound when sampled; for ``lm`` the Shapley value of the loss it removes, in nats, left out when not measured: a TRAINING seed or a fossil is not in
    the counterfactuals; ``SLOT  no seed`` for an empty slot), and that slot's events (their
    ``SLOT: `` prefix dropped) indented under it; the empty slots to which nothing happened
    are named together on a last line, ``no seed in SLOT, SLOT``.
    """
    quality = f"ppl {_fmt(record.perplexity, '.2f')}" if task_type == "lm" else f"val {_fmt(record.val_accuracy, '5.1f')}%"
    head = f"epoch {record.epoch:>2}/{epochs} | loss {_fmt(record.train_loss, '.4f', 'nan')} | {quality} " \
           f"(train {_fmt(record.train_accuracy, '5.1f')}%) | "
    if record.slots is None:
        if task_type == "lm":
            judged = f"loss drop {_fmt(record.seed_contribution, '+.4f'):>7} nats"
        else:
            judged = f"contribution {_fmt(record.seed_contribution, '+.2f'):>6}"
        line = (head + f"stage {record.stage:<12} | alpha {record.alpha:.2f} | "
                f"{judged} | {record.epoch_time_s:.1f}s")
        if record.candidates or record.judgements:
            # Candidates' events (several seeds named, a judgement) go on lines of their own.
            return [line] + _event_lines(record.events or [], SLOT_INDENT)
        if record.events:
            line += " | " + "; ".join(record.events)
        return [line]

    lines = [head + f"{record.epoch_time_s:.1f}s"]
    slots = record.slots
    by_slot: dict[str, list[str]] = {slot_id: [] for slot_id in slots}
    unplaced = []
    for event in record.events or ():
        slot_id, _, what = event.partition(": ")
        if slot_id in by_slot and what:
            by_slot[slot_id].append(what)
        else:
            unplaced.append(event)
    lines += _event_lines(unplaced, SLOT_INDENT)
    # An empty slot to which nothing happened gets no line of its own: they are named together.
    idle = [slot_id for slot_id, slot in slots.items() if not _holds_seed(slot) and not by_slot[slot_id]]
    shown = [slot_id for slot_id in slots if slot_id not in idle]
    id_width = max((len(slot_id) for slot_id in shown), default=0)
    seed_width = max(len(slots[slot_id].get("seed_id") or "") for slot_id in shown) if shown else 0
    for slot_id in shown:
        lines.append(SLOT_INDENT + _slot_detail(slot_id.ljust(id_width), slots[slot_id], seed_width, task_type))
        lines += _event_lines(by_slot[slot_id], EVENT_INDENT)
    if idle:
        lines += textwrap.wrap("no seed in " + ", ".join(idle), COLUMNS, initial_indent=SLOT_INDENT,
                               subsequent_indent=SLOT_INDENT + "  ", break_on_hyphens=False)
    return lines


def _holds_seed(slot: Mapping) -> bool:
    return slot.get("seed_id") is not None and slot.get("stage") not in (None, "NONE")


# Per task type, the value a slot's seed is judged by: its record key, name, formats and unit.
_SLOT_VALUE = {
    "classification": ("shapley", "Shapley value", "+6.2f", ".2f", "points"),
    "lm": ("loss_shapley", "loss Shapley value", "+.4f", ".4f", "nats"),
}


def _slot_detail(slot_id: str, slot: Mapping, seed_width: int, task_type: str = "classification") -> str:
    """``SLOT  SEED  STAGE  alpha A  Shapley value V points`` (``SLOT  no seed`` when empty);
    for ``lm`` the value its seed is judged by, ``loss Shapley value V nats``."""
    if not _holds_seed(slot):
        return f"{slot_id}  no seed"
    detail = f"{slot_id}  {slot['seed_id']:<{seed_width}}  {slot['stage']:<12}  alpha {slot['alpha']:.2f}"
    key, what, spec, error_spec, unit = _SLOT_VALUE[task_type]
    value = slot.get(key)
    if value is not None:
        detail += f"  {what} {value:{spec}}"
        if slot.get(f"{key}_error") is not None:
            detail += f" +/- {slot[key + '_error']:{error_spec}}"
        detail += f" {unit}"
    return detail


def _event_lines(events: list[str], indent: str) -> list[str]:
    """``events`` joined by ``; `` onto lines of at most :data:`COLUMNS` columns, each
    starting with ``indent``; an event too long for one line is wrapped at spaces, its
    following lines indented two more."""
    lines: list[str] = []
    for event in events:
        if lines and len(lines[-1]) + 2 + len(event) <= COLUMNS:
            lines[-1] += "; " + event
        else:
            lines += textwrap.wrap(event, COLUMNS, initial_indent=indent, subsequent_indent=indent + "  ",
                                   break_long_words=False, break_on_hyphens=False)
    return lines


def where_stopped(epochs_done: int, steps_done: int, epochs: int, steps_per_epoch: int) -> str:
    """Where a stopped run stands, for the line that says it stopped: ``after 3 of 8 epochs``,
    and when it stopped inside an epoch ``after 3 of 8 epochs and 8 of 50 steps of epoch 4``
    (the steps the checkpoint holds, which a resume goes on from)."""
    where = f"after {epochs_done} of {epochs} epochs"
    if steps_done:
        where += f" and {steps_done} of {steps_per_epoch} steps of epoch {epochs_done + 1}"
    return where
