"""The run plot: accuracy, loss (perplexity for a language model), alpha and the seed's
contribution per epoch, over coloured lifecycle bands, with germinations, culls,
fossilizations and rollbacks marked. A run of several slots gets a lane of stages per slot
(each seed named in its lane, its germination, cull or fossilization marked there), each
slot's alpha and each seed's Shapley value instead. Legends sit to the right of their
panel, clear of the curves; the title says how the run stands in at most three lines.

Reads the epoch records a run writes to ``metrics.jsonl`` (see
:class:`~esper_fast.train.report.EpochRecord`), so ``esper-fast plot DIR`` redraws a run's
plot from its log alone (and, for its title, ``run.json`` and whether a process holds the
run's lock).
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

from esper_fast.train.console import where_stopped
from esper_fast.train.report import EpochRecord
from esper_fast.train.run_dir import LOCK_FILE, STATUS_FILE, read_log

# Band colours per lifecycle stage; stages not listed (no seed) get no band.
STAGE_COLOURS = {
    "GERMINATED": "#c7c7c7",
    "TRAINING": "#9ecae1",
    "BLENDING": "#fdd0a2",
    "SHADOWING": "#dadaeb",
    "PROBATIONARY": "#fcbba1",
    "FOSSILIZED": "#a1d99b",
}
GERMINATION_COLOUR = "#2ca02c"
ROLLBACK_COLOUR = "#d62728"
# How a seed's end is marked (at the end of the epoch that decided it): matplotlib marker,
# colour, size.
FATE_MARKERS = {"culled": ("X", "#d62728", 9), "fossilized": ("*", "#006d2c", 13)}
# One colour, dash pattern and marker per slot (alpha lines and Shapley bars), in the host's
# order: slots whose alpha curves are equal stay told apart.
SLOT_COLOURS = ("#ff7f0e", "#1f77b4", "#9467bd", "#8c564b", "#e377c2", "#17becf")
SLOT_DASHES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (8, 2)))
SLOT_MARKERS = ("o", "s", "^", "D", "v", "P")
# Each slot's alpha line is drawn this much above the one before (centred on the true value),
# so that equal curves lie side by side instead of on top of each other.
ALPHA_OFFSET = 0.02
# And each slot's markers (at the end of each epoch) this many epochs after the one before.
MARKER_STAGGER = 0.07
# The title: lines of at most this many characters, at most this many lines.
TITLE_WIDTH = 100
TITLE_LINES = 3
# What the contribution panel measures, said on the plot so that nobody reads it as the gain
# over a host trained without the seed.
CONTRIBUTION_NOTE = (
    "contribution = validation accuracy with the seed minus with alpha forced to 0, measured on the "
    "host it co-adapted with (not the gain over a host trained without it)"
)
SHAPLEY_NOTE = (
    "Shapley value = the seed's mean gain in validation accuracy over every subset of the live seeds in the "
    "forward (the others' alpha forced to 0), on the host it co-adapted with; bars: 95% bound when sampled. "
    f"Alpha lines are shifted {ALPHA_OFFSET:g} apart per slot so that equal curves stay visible."
)
# The same notes for a language model, whose seeds are judged by the validation loss they remove.
LM_CONTRIBUTION_NOTE = (
    "loss drop = validation loss with alpha forced to 0 minus with the seed (nats; positive helps), measured on "
    "the host it co-adapted with (not the gain over a host trained without it)"
)
LM_SHAPLEY_NOTE = (
    "loss Shapley value = the seed's mean fall of the validation loss (nats) over every subset of the live seeds "
    "in the forward (the others' alpha forced to 0), on the host it co-adapted with; bars: 95% bound when "
    f"sampled. Alpha lines are shifted {ALPHA_OFFSET:g} apart per slot so that equal curves stay visible."
)


def read_epoch_records(path: str | Path) -> list[EpochRecord]:
    """The epoch records of a metrics JSONL file, in order, each epoch once (a line that is
    not whole JSON, as a crash mid-write leaves, is skipped)."""
    records: dict[int, EpochRecord] = {}
    for record in read_log(path):
        if record.get("type") == EpochRecord.TYPE:
            records[record["epoch"]] = EpochRecord.from_log(record)
    return [records[e] for e in sorted(records)]


def _number(value) -> float:
    """A logged value as a float: NaN for a missing one, infinities from their JSON strings."""
    if value in ("inf", "-inf"):
        return float(value)
    return math.nan if value is None else float(value)


def _germinations(records: list[EpochRecord]) -> list[tuple[int, str]]:
    """(epoch, seed id) for each germination: a seed germinates at the end of that epoch."""
    found = []
    for record in records:
        for event in record.events or ():
            if event.startswith("germinated "):
                what = event.split()[1]
                if event.split(":")[0].endswith(" candidates"):  # "germinated 4 candidates: ..."
                    what = f"{what} candidates"
                found.append((record.epoch, what))
    return found


# Candidates' values at a judgement: one hatched bar per candidate beside the epoch's own.
JUDGEMENT_COLOURS = ["#1f77b4", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#ff7f0e"]


def _draw_judgements(ax, records: list[EpochRecord]) -> bool:
    """Each judgement's candidates as bars of their value (accuracy points, or for ``lm`` the
    loss removed) around the judgement epoch, the winner's edged in black and named so in the
    legend. True if there was one."""
    drawn = False
    for record in records:
        for slot_id, judgement in (record.judgements or {}).items():
            candidates = judgement["candidates"]
            width = 0.7 / max(1, len(candidates))
            for index, candidate in enumerate(candidates):
                x = record.epoch - 0.35 + width * (index + 0.5)
                won = candidate["seed_id"] == judgement["winner"]
                label = f"{candidate['blueprint']} ({candidate['seed_id']}){' wins' if won else ''}"
                if len(record.judgements) > 1:
                    label = f"{slot_id}: {label}"
                ax.bar([x], [_number(candidate["value"])], width=width * 0.9, hatch="//", zorder=3,
                       color=JUDGEMENT_COLOURS[index % len(JUDGEMENT_COLOURS)], alpha=0.85,
                       edgecolor="black" if won else "white", lw=1.6 if won else 0.5, label=label)
            ax.annotate("judgement", (record.epoch, 1.0), xycoords=("data", "axes fraction"), xytext=(0, -10),
                        textcoords="offset points", ha="center", fontsize=8, color="#333333")
            drawn = True
    return drawn


def _slot_ids(records: list[EpochRecord]) -> list[str]:
    """The slots of a run of several (in the host's order), [] for a run of one."""
    found: dict[str, None] = {}
    for record in records:
        found.update(dict.fromkeys(record.slots or ()))
    return list(found)


def _has_seed(stage) -> bool:
    return stage not in (None, "NONE")


def _fate(stage, stage_after) -> str | None:
    """What the end of an epoch did to a slot's seed: ``germinated``, ``culled``,
    ``fossilized`` or None (from the stage it trained in and the stage after the decision)."""
    if not _has_seed(stage):
        return "germinated" if _has_seed(stage_after) else None
    if not _has_seed(stage_after):
        return "culled"
    if stage_after == "FOSSILIZED" and stage != "FOSSILIZED":
        return "fossilized"
    return None


def fates(records: Sequence[EpochRecord]) -> list[tuple[str | None, int, str]]:
    """(slot id, epoch, what) for every germination, cull and fossilization of the run, in
    order (slot id None in a run of one slot); each happened at the end of that epoch."""
    found = []
    slots = _slot_ids(list(records))
    for record in records:
        if not slots:
            what = _fate(record.stage, record.stage_after)
            if what:
                found.append((None, record.epoch, what))
        for slot_id in slots:
            slot = (record.slots or {}).get(slot_id)
            what = slot and _fate(slot.get("stage"), slot.get("stage_after"))
            if what:
                found.append((slot_id, record.epoch, what))
    return found


# ---------------------------------------------------------------- the title

def run_title(config: Mapping, records: Sequence[EpochRecord], summary: Mapping | None = None, *,
              position: tuple[int, int] | None = None, status: Mapping | None = None,
              running: bool | None = None) -> str:
    """The plot's title, at most :data:`TITLE_LINES` lines: the run (task, device, its number
    of slots when several) and how it stands, then the seed's outcome (one slot) or the
    seeds' fates counted (several: each seed's fate is marked in its lane).

    ``config``: the log's config record (``task``, ``device``, ``epochs``,
    ``steps_per_epoch``); ``summary``: the log's closing record, None when it has none;
    ``position``: (epochs done, steps done of the next) that the last checkpoint holds, else
    ``status`` (``run.json``) gives it; ``running``: whether a process holds the run (None:
    not known). A log without a summary is a run in progress only while a process holds it;
    otherwise it ended without one (killed, or crashed) or failed, as ``run.json`` says.
    """
    records = list(records)
    slots = _slot_ids(records)
    status = status or {}
    epochs = config.get("epochs") or (summary or {}).get("epochs_planned") or status.get("epochs") or "?"
    logged = records[-1].epoch if records else 0
    if position is None:
        position = (status.get("epochs_done") or logged, status.get("steps_done") or 0)
    where = where_stopped(*position, epochs, config.get("steps_per_epoch", "?"))
    extra = None
    if summary is not None and summary.get("status", "finished") == "finished":
        state = f"finished, {len(records)} epochs"
    elif summary is not None:
        state = f"stopped by {summary.get('stopped_by') or 'a signal'} {where}"
    elif status.get("status") == "failed":
        state = f"failed {where}"
        extra = status.get("error")
    elif status.get("status") == "interrupted":  # a second signal: stopped at once, no summary
        state = f"stopped at once by {status.get('stopped_by') or 'a signal'} {where}"
    elif running:
        state = f"in progress, {logged} of {epochs} epochs done"
    elif running is None:
        state = f"no summary yet: {logged} of {epochs} epochs logged (in progress, or ended without one)"
    else:
        state = f"unfinished at {logged} of {epochs} epochs: no summary, and no process runs it (killed or crashed)"
    head = f"{config.get('task', '?')} on {config.get('device', '?')}"
    if slots:
        head += f", {len(slots)} slots"
    lines = [f"{head}: {state}"]
    if extra:
        lines.append(extra)
    if slots:
        counted = Counter(what for _, _, what in fates(records))
        counted["still live"] = counted["germinated"] - counted["culled"] - counted["fossilized"]
        if counted["germinated"]:
            lines.append("seeds: " + ", ".join(f"{counted[what]} {what}" for what in
                                               ("germinated", "fossilized", "culled", "still live") if counted[what])
                         + " (see the stage lanes)")
    elif summary is not None and summary.get("seed_outcome"):
        outcome = summary["seed_outcome"]
        if any(r.judgements for r in records):  # the losers are on the judgement's bars
            outcome = "; ".join(fate for fate in outcome.split("; ") if not fate.endswith(": lost_judgement"))
        lines.append(outcome)
    judged = [(r.epoch, j) for r in records for j in (r.judgements or {}).values()]
    for epoch, judgement in judged[:2]:
        won = next(c for c in judgement["candidates"] if c["seed_id"] == judgement["winner"])
        lines.append(f"judgement at epoch {epoch}{' in ' + judgement['slot'] if slots else ''}: {won['blueprint']} "
                     f"won of {len(judgement['candidates'])} candidates")
    return _fit_title(lines)


def _fit_title(lines: list[str]) -> str:
    """``lines`` wrapped to :data:`TITLE_WIDTH`, cut to :data:`TITLE_LINES` (the last kept
    line ending in ``...`` when something was cut)."""
    wrapped = [part for line in lines for part in textwrap.wrap(line, TITLE_WIDTH) or [""]]
    if len(wrapped) > TITLE_LINES:
        wrapped = wrapped[:TITLE_LINES]
        wrapped[-1] = wrapped[-1][:TITLE_WIDTH - 3].rstrip() + "..."
    return "\n".join(wrapped)


def _held(folder: Path) -> bool | None:
    """Whether a process holds the lock of the run in ``folder`` (runs it now); None when
    there is no lock file to ask. The probe takes a shared lock for an instant."""
    import fcntl

    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the panels

def _outside_legend(ax, **kwargs):
    """A legend to the right of ``ax``, clear of what it draws."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8,
                     framealpha=0.9, **kwargs)


def _accuracy_panel(ax, records: list[EpochRecord], chance: float | None, baseline: bool) -> None:
    epochs = [r.epoch for r in records]
    ax.plot(epochs, [_number(r.val_accuracy) for r in records], "o-", color="#1f77b4", label="validation")
    ax.plot(epochs, [_number(r.train_accuracy) for r in records], "s--", color="#7f7f7f", ms=4, label="train (first batches)")
    values = [_number(r.baseline_accuracy) for r in records]
    if baseline and any(not math.isnan(b) for b in values):
        ax.plot(epochs, values, "x", color="#9467bd", ms=7, label="validation, alpha forced to 0")
    if chance is not None:
        ax.axhline(chance, color="#bbbbbb", lw=1, ls=":", label="chance")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(bottom=0)


def _loss_panel(ax, records: list[EpochRecord], task_type: str) -> None:
    epochs = [r.epoch for r in records]
    train_loss = [_number(r.train_loss) for r in records]
    val_loss = [_number(r.val_loss) for r in records]
    if task_type == "lm":
        # exp overflows past ~700 nats; such a loss is off any useful perplexity scale.
        def perplexity(loss):
            return math.exp(min(loss, 50.0)) if math.isfinite(loss) else math.nan

        ax.plot(epochs, [perplexity(x) for x in train_loss], "s--", color="#7f7f7f", ms=4, label="train (mean of steps)")
        ax.plot(epochs, [perplexity(x) for x in val_loss], "o-", color="#1f77b4", label="validation")
        ax.set_yscale("log")
        ax.set_ylabel("perplexity")
    else:
        ax.plot(epochs, train_loss, "s--", color="#7f7f7f", ms=4, label="train (mean of steps)")
        ax.plot(epochs, val_loss, "o-", color="#1f77b4", label="validation")
        ax.set_ylabel("loss")
    _outside_legend(ax)


def _alpha_path(epochs: list[int], starts: list, ends: list) -> tuple[list[float], list[float]]:
    """Alpha moves within an epoch while blending: each epoch from its start to its end value."""
    xs, ys = [], []
    for epoch, start, end in zip(epochs, starts, ends):
        end = _number(end)
        xs += [epoch - 0.5, epoch + 0.5]
        ys += [end if start is None else float(start), end]
    return xs, ys


def _mark_rollbacks(axes, records: list[EpochRecord]) -> None:
    for ax in axes:
        for record in records:
            if record.rollback:
                ax.axvline(record.epoch, color=ROLLBACK_COLOUR, ls="--", lw=1.5)


def _fate_handles(found: list[tuple[str | None, int, str]], records: list[EpochRecord]) -> list:
    """Legend entries for the marks the plot carries: germination, cull, fossilization,
    rollback (only those that happened)."""
    from matplotlib.lines import Line2D

    kinds = {what for _, _, what in found}
    handles = []
    if "germinated" in kinds:
        handles.append(Line2D([], [], color=GERMINATION_COLOUR, ls=":", lw=2, label="germination"))
    for what in ("culled", "fossilized"):
        if what in kinds:
            marker, colour, size = FATE_MARKERS[what]
            handles.append(Line2D([], [], ls="", marker=marker, color=colour, ms=size * 0.8, label=what))
    if any(r.rollback for r in records):
        handles.append(Line2D([], [], color=ROLLBACK_COLOUR, ls="--", label="governor rollback"))
    return handles


def plot_run(records: Sequence[EpochRecord | Mapping], path: str | Path, title: str = "",
             chance: float | None = None, task_type: str = "classification") -> Path:
    """Draws the run (see :func:`draw_run`) to a PNG at ``path``."""
    import matplotlib.pyplot as plt

    fig = draw_run(records, title, chance, task_type)
    try:
        path = Path(path)
        fig.savefig(path, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path


def draw_run(records: Sequence[EpochRecord | Mapping], title: str = "", chance: float | None = None,
             task_type: str = "classification"):
    """The run's figure (matplotlib, Agg; the caller closes it): panels sharing the epoch
    axis. ``records`` are :class:`EpochRecord` objects or the epoch dicts of a log (a missing
    value is not drawn); ``title``: see :func:`run_title` (wrapped and cut to
    :data:`TITLE_LINES` lines), above the panels.

    1. validation / train accuracy (and the alpha=0 baseline where attribution ran),
    2. train and validation loss; for ``task_type="lm"`` their perplexity, log scale,
    3. the blend alpha over each epoch (start to end), the seed's cull or fossilization
       marked on it,
    4. the counterfactual seed contribution (percentage points; for ``lm`` the validation loss
       the seed removes, nats), with what it measures.
    Every panel carries the stage bands; germinations are green dotted lines (between the
    epoch that germinated and the first the seed trained in), rollbacks red dashed lines.

    Records of several slots (their ``slots``) get five panels instead: accuracy, loss, a
    lane of stages per slot (each seed named in its lane, its germination, cull and
    fossilization marked there), every slot's alpha (a colour, dash and marker per slot,
    the lines shifted apart so that equal ones stay visible), and every live seed's Shapley
    value per epoch (bars, with the 95% bound when sampled). Legends sit right of their
    panels.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    records = [r if isinstance(r, EpochRecord) else EpochRecord.from_log(r) for r in records]
    slots = _slot_ids(records)
    if slots:
        fig, axes = plt.subplots(5, 1, figsize=(11.5, 12.5 + 0.3 * len(slots)), sharex=True, layout="constrained",
                                 gridspec_kw={"height_ratios": [3, 2, 0.45 * len(slots) + 0.6, 1.6, 1.8]})
        draw, note = _draw_slots, LM_SHAPLEY_NOTE if task_type == "lm" else SHAPLEY_NOTE
    else:
        fig, axes = plt.subplots(4, 1, figsize=(11, 10.5), sharex=True, layout="constrained",
                                 gridspec_kw={"height_ratios": [3, 2, 1.2, 1.5]})
        draw, note = _draw_one_slot, LM_CONTRIBUTION_NOTE if task_type == "lm" else CONTRIBUTION_NOTE
    try:
        draw(axes, records, slots, chance, task_type)
        fig.suptitle(_fit_title((title or "esper-fast run").splitlines()), fontsize=10)
        axes[-1].set_xlabel("epoch")
        epochs = [r.epoch for r in records]
        if len(epochs) <= 25:
            axes[-1].set_xticks(epochs)
        else:
            from matplotlib.ticker import MaxNLocator

            axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
        # The note goes under the panels, in a strip the layout leaves free.
        fig.get_layout_engine().set(rect=(0, 0.03, 1, 0.97))
        fig.text(0.01, 0.004, "\n".join(textwrap.wrap(note, 190)), fontsize=7, color="#444444")
    except BaseException:
        plt.close(fig)
        raise
    return fig


def _draw_one_slot(axes, records: list[EpochRecord], slots, chance: float | None, task_type: str) -> None:
    from matplotlib.patches import Patch

    ax_acc, ax_loss, ax_alpha, ax_contrib = axes
    epochs = [r.epoch for r in records]
    stages_seen = []
    germinations = _germinations(records)
    for ax in axes:
        for record in records:
            colour = STAGE_COLOURS.get(record.stage or "")
            if colour is not None:
                ax.axvspan(record.epoch - 0.5, record.epoch + 0.5, color=colour, alpha=0.55, lw=0)
                if record.stage not in stages_seen:
                    stages_seen.append(record.stage)
        for epoch, _ in germinations:
            ax.axvline(epoch + 0.5, color=GERMINATION_COLOUR, ls=":", lw=2)
    _mark_rollbacks(axes, records)
    for epoch, seed_id in germinations:
        ax_acc.annotate(f"{seed_id} germinated", (epoch + 0.5, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(3, -12), textcoords="offset points", fontsize=8, color=GERMINATION_COLOUR)

    _accuracy_panel(ax_acc, records, chance, baseline=True)
    found = fates(records)
    handles, _ = ax_acc.get_legend_handles_labels()
    handles += [Patch(color=STAGE_COLOURS[s], alpha=0.55, label=s.lower()) for s in stages_seen]
    handles += _fate_handles(found, records)
    _outside_legend(ax_acc, handles=handles)

    _loss_panel(ax_loss, records, task_type)

    ax_alpha.plot(*_alpha_path(epochs, [r.alpha_start for r in records], [r.alpha for r in records]), color="#ff7f0e")
    alpha_at = {r.epoch: _number(r.alpha) for r in records}
    for _, epoch, what in found:
        if what in FATE_MARKERS:
            marker, colour, size = FATE_MARKERS[what]
            y = alpha_at[epoch] if math.isfinite(alpha_at[epoch]) else 0.5
            ax_alpha.plot([epoch + 0.5], [y], ls="", marker=marker, color=colour, ms=size, mec="white", mew=0.8,
                          zorder=5, clip_on=False)
    ax_alpha.set_ylim(-0.08, 1.08)
    ax_alpha.set_ylabel("alpha")

    contrib = [_number(r.seed_contribution) for r in records]
    colours = ["#2ca02c" if c >= 0 else "#d62728" for c in contrib]
    ax_contrib.bar(epochs, [0.0 if math.isnan(c) else c for c in contrib], color=colours, width=0.6)
    ax_contrib.axhline(0, color="black", lw=0.8)
    ax_contrib.set_ylabel("seed loss drop\n(nats)" if task_type == "lm" else "seed contribution\n(points)")
    if _draw_judgements(ax_contrib, records):
        _outside_legend(ax_contrib, title="candidates at alpha 1", title_fontsize=8)


def _seed_spans(records: list[EpochRecord], slot_id: str) -> list[tuple[str, int, int]]:
    """(seed id, first epoch, last epoch) of every seed the slot held, in order."""
    spans: list[list] = []
    for record in records:
        slot = (record.slots or {}).get(slot_id) or {}
        seed_id = slot.get("seed_id") if _has_seed(slot.get("stage")) else None
        if seed_id is None:
            continue
        if spans and spans[-1][0] == seed_id and spans[-1][2] == record.epoch - 1:
            spans[-1][2] = record.epoch
        else:
            spans.append([seed_id, record.epoch, record.epoch])
    return [tuple(span) for span in spans]


def _draw_slots(axes, records: list[EpochRecord], slots: list[str], chance: float | None, task_type: str) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ax_acc, ax_loss, ax_stages, ax_alpha, ax_shapley = axes
    epochs = [r.epoch for r in records]
    style = {slot_id: (SLOT_COLOURS[i % len(SLOT_COLOURS)], SLOT_DASHES[i % len(SLOT_DASHES)],
                       SLOT_MARKERS[i % len(SLOT_MARKERS)]) for i, slot_id in enumerate(slots)}

    def slot_field(record: EpochRecord, slot_id: str, key: str):
        return (record.slots or {}).get(slot_id, {}).get(key)

    # Stage lanes: one row per slot, host order from the top; each seed named where its bar
    # begins; a germination is a dotted line between the epoch that germinated the seed and
    # the first it trained in, a cull or fossilization a mark at the end of the deciding epoch.
    stages_seen = []
    lane = {slot_id: len(slots) - 1 - row for row, slot_id in enumerate(slots)}
    for slot_id in slots:
        y = lane[slot_id]
        for record in records:
            stage = slot_field(record, slot_id, "stage")
            colour = STAGE_COLOURS.get(stage or "")
            if colour is not None:
                ax_stages.broken_barh([(record.epoch - 0.5, 1.0)], (y - 0.4, 0.8), color=colour, lw=0)
                if stage not in stages_seen:
                    stages_seen.append(stage)
        for seed_id, first, _ in _seed_spans(records, slot_id):
            ax_stages.text(first - 0.45, y, seed_id, fontsize=7, va="center", ha="left", color="#333333",
                           clip_on=True)
    found = fates(records)
    for slot_id, epoch, what in found:
        y = lane[slot_id]
        if what == "germinated":
            ax_stages.plot([epoch + 0.5] * 2, [y - 0.45, y + 0.45], color=GERMINATION_COLOUR, ls=":", lw=2)
        else:
            marker, colour, size = FATE_MARKERS[what]
            ax_stages.plot([epoch + 0.5], [y], ls="", marker=marker, color=colour, ms=size, mec="white", mew=0.8,
                           zorder=5, clip_on=False)
    ax_stages.set_yticks(range(len(slots)), list(reversed(slots)), fontsize=8)
    ax_stages.set_ylim(-0.6, len(slots) - 0.4)
    ax_stages.set_ylabel("stage")
    _mark_rollbacks(axes, records)
    stage_handles = [Patch(color=STAGE_COLOURS[s], label=s.lower()) for s in stages_seen]
    stage_handles += _fate_handles(found, records)
    if stage_handles:
        _outside_legend(ax_stages, handles=stage_handles)

    _accuracy_panel(ax_acc, records, chance, baseline=False)
    _outside_legend(ax_acc)

    _loss_panel(ax_loss, records, task_type)

    centre = (len(slots) - 1) / 2
    slot_handles = []
    for i, slot_id in enumerate(slots):
        colour, dash, marker = style[slot_id]
        xs, ys = _alpha_path(epochs, [slot_field(r, slot_id, "alpha_start") for r in records],
                             [slot_field(r, slot_id, "alpha") for r in records])
        shift = (i - centre) * ALPHA_OFFSET
        ys = [y + shift for y in ys]
        ax_alpha.plot(xs, ys, color=colour, ls=dash, lw=1.6)
        # A marker on each epoch's line, the slots' markers staggered towards the epoch's end
        # so that those of equal curves sit side by side.
        back = (len(slots) - 1 - i) * MARKER_STAGGER
        ax_alpha.plot([end - back for end in xs[1::2]],
                      [y1 - (y1 - y0) * back for y0, y1 in zip(ys[0::2], ys[1::2])],
                      ls="", marker=marker, ms=5, color=colour, mec="white", mew=0.5)
        slot_handles.append(Line2D([], [], color=colour, ls=dash, marker=marker, ms=5, label=slot_id))
    ax_alpha.set_ylim(-0.05 - ALPHA_OFFSET * centre, 1.05 + ALPHA_OFFSET * centre)
    ax_alpha.set_ylabel("alpha")
    _outside_legend(ax_alpha, handles=slot_handles, title="slots", title_fontsize=8)

    # A language model's seeds are judged by the loss they remove (nats), a classifier's by
    # accuracy points.
    judged = "loss_shapley" if task_type == "lm" else "shapley"
    width = 0.8 / len(slots)
    for i, slot_id in enumerate(slots):
        offsets = [e - 0.4 + width * (i + 0.5) for e in epochs]
        values = [_number(slot_field(r, slot_id, judged)) for r in records]
        errors = [_number(slot_field(r, slot_id, f"{judged}_error")) for r in records]
        drawn = [(x, v, 0.0 if math.isnan(e) else e) for x, v, e in zip(offsets, values, errors) if not math.isnan(v)]
        if drawn:
            xs, vs, es = zip(*drawn)
            ax_shapley.bar(xs, vs, width=width, color=style[slot_id][0], label=slot_id,
                           yerr=es if any(es) else None, capsize=2)
    _draw_judgements(ax_shapley, records)
    ax_shapley.axhline(0, color="black", lw=0.8)
    ax_shapley.set_ylabel("loss Shapley value\n(nats)" if task_type == "lm" else "Shapley value\n(points)")
    if ax_shapley.get_legend_handles_labels()[0]:
        _outside_legend(ax_shapley)
    else:
        ax_shapley.text(0.5, 0.5, "no Shapley value measured: no seed was blended into the forward",
                        transform=ax_shapley.transAxes, ha="center", va="center", fontsize=9, color="#666666")


def plot_log(log_path: str | Path, png_path: str | Path) -> Path:
    """Redraws a run's plot from its ``metrics.jsonl`` into ``png_path`` (written to a
    temporary file, then renamed: a reader never sees half a PNG), titled by
    :func:`run_title` from the log, the run's ``run.json`` beside it and whether a process
    holds the run. ValueError when the log holds no epoch."""
    log_path = Path(log_path)
    log = read_log(log_path)
    records = read_epoch_records(log_path)
    if not records:
        raise ValueError(f"{log_path} holds no epoch record yet")
    config = next((r for r in log if r.get("type") == "config"), {})
    # A resume rewrites the log up to its checkpoint: only a last record speaks of the end.
    summary = log[-1] if log[-1].get("type") == "summary" else None
    try:
        status = json.loads((log_path.parent / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        status = None
    title = run_title(config, records, summary, status=status, running=_held(log_path.parent))
    png_path = Path(png_path)
    temporary = png_path.with_name(f".{png_path.name}.{os.getpid()}.tmp")
    try:
        plot_run(records, temporary, title=title, chance=config.get("chance_accuracy"),
                 task_type=config.get("task_type", "classification"))
        os.replace(temporary, png_path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return png_path
