"""The run plot: accuracy, loss (perplexity for a language model), alpha and the seed's
contribution per epoch, over coloured lifecycle bands, with germinations and rollbacks marked.
A run of several slots gets a lane of stages per slot, each slot's alpha and each seed's
Shapley value instead.

Reads the epoch records a run writes to ``metrics.jsonl`` (see
:class:`~esper_fast.train.report.EpochRecord`), so ``esper-fast plot DIR`` redraws a run's
plot from its log alone.
"""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path
from typing import Mapping, Sequence

from esper_fast.train.report import EpochRecord
from esper_fast.train.run_dir import read_log

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
# One colour per slot (alpha lines and Shapley bars), in the host's order.
SLOT_COLOURS = ("#ff7f0e", "#1f77b4", "#9467bd", "#8c564b", "#e377c2", "#17becf")
# What the contribution panel measures, said on the plot so that nobody reads it as the gain
# over a host trained without the seed.
CONTRIBUTION_NOTE = (
    "contribution = validation accuracy with the seed minus with alpha forced to 0, measured on the "
    "host it co-adapted with (not the gain over a host trained without it)"
)
SHAPLEY_NOTE = (
    "Shapley value = the seed's mean gain in validation accuracy over every subset of the live seeds in the "
    "forward (the others' alpha forced to 0), on the host it co-adapted with; bars: 95% bound when sampled"
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
                found.append((record.epoch, event.split()[1]))
    return found


def _slot_ids(records: list[EpochRecord]) -> list[str]:
    """The slots of a run of several (in the host's order), [] for a run of one."""
    found: dict[str, None] = {}
    for record in records:
        found.update(dict.fromkeys(record.slots or ()))
    return list(found)


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
    ax.legend(loc="best", fontsize=8, framealpha=0.85)


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


def plot_run(records: Sequence[EpochRecord | Mapping], path: str | Path, title: str = "",
             chance: float | None = None, task_type: str = "classification") -> Path:
    """Draws the run to a PNG at ``path``: panels sharing the epoch axis. ``records`` are
    :class:`EpochRecord` objects or the epoch dicts of a log (a missing value is not drawn).

    1. validation / train accuracy (and the alpha=0 baseline where attribution ran),
    2. train and validation loss; for ``task_type="lm"`` their perplexity, log scale,
    3. the blend alpha over each epoch (start to end),
    4. the counterfactual seed contribution (percentage points), with what it measures.
    Every panel carries the stage bands; germinations are green dotted lines (between the
    epoch that germinated and the first the seed trained in), rollbacks red dashed lines.

    Records of several slots (their ``slots``) get five panels instead: accuracy, loss, a
    lane of stages per slot (each seed's germination marked in its lane), every slot's alpha,
    and every live seed's Shapley value per epoch (bars, with the 95% bound when sampled).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    records = [r if isinstance(r, EpochRecord) else EpochRecord.from_log(r) for r in records]
    slots = _slot_ids(records)
    if slots:
        fig, axes = plt.subplots(5, 1, figsize=(9, 12.5), sharex=True,
                                 gridspec_kw={"height_ratios": [3, 2, 0.45 * len(slots) + 0.6, 1.2, 1.8]})
        draw, note = _draw_slots, SHAPLEY_NOTE
    else:
        fig, axes = plt.subplots(4, 1, figsize=(9, 10.5), sharex=True, gridspec_kw={"height_ratios": [3, 2, 1.2, 1.5]})
        draw, note = _draw_one_slot, CONTRIBUTION_NOTE
    try:
        draw(axes, records, slots, chance, task_type)
        if slots:  # the outcome of every slot: a long title
            axes[0].set_title("\n".join(textwrap.wrap(title or "esper-fast run", 110)), fontsize=9)
        else:
            axes[0].set_title(title or "esper-fast run")
        axes[-1].set_xlabel("epoch")
        axes[-1].set_xticks([r.epoch for r in records])
        fig.tight_layout(rect=(0, 0.035, 1, 1))
        fig.text(0.01, 0.008, note, fontsize=7, color="#444444", wrap=True)
        path = Path(path)
        fig.savefig(path, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path


def _draw_one_slot(axes, records: list[EpochRecord], slots, chance: float | None, task_type: str) -> None:
    from matplotlib.lines import Line2D
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
    handles, _ = ax_acc.get_legend_handles_labels()
    handles += [Patch(color=STAGE_COLOURS[s], alpha=0.55, label=s.lower()) for s in stages_seen]
    if germinations:
        handles.append(Line2D([], [], color=GERMINATION_COLOUR, ls=":", lw=2, label="germination"))
    if any(r.rollback for r in records):
        handles.append(Line2D([], [], color=ROLLBACK_COLOUR, ls="--", label="governor rollback"))
    ax_acc.legend(handles=handles, loc="best", fontsize=8, ncol=2, framealpha=0.85)

    _loss_panel(ax_loss, records, task_type)

    ax_alpha.plot(*_alpha_path(epochs, [r.alpha_start for r in records], [r.alpha for r in records]), color="#ff7f0e")
    ax_alpha.set_ylim(-0.05, 1.05)
    ax_alpha.set_ylabel("alpha")

    contrib = [_number(r.seed_contribution) for r in records]
    colours = ["#2ca02c" if c >= 0 else "#d62728" for c in contrib]
    ax_contrib.bar(epochs, [0.0 if math.isnan(c) else c for c in contrib], color=colours, width=0.6)
    ax_contrib.axhline(0, color="black", lw=0.8)
    ax_contrib.set_ylabel("seed contribution\n(points)")


def _draw_slots(axes, records: list[EpochRecord], slots: list[str], chance: float | None, task_type: str) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ax_acc, ax_loss, ax_stages, ax_alpha, ax_shapley = axes
    epochs = [r.epoch for r in records]
    colour_of = {slot_id: SLOT_COLOURS[i % len(SLOT_COLOURS)] for i, slot_id in enumerate(slots)}

    def slot_field(record: EpochRecord, slot_id: str, key: str):
        return (record.slots or {}).get(slot_id, {}).get(key)

    # Stage lanes: one row per slot, host order from the top; a seed's germination is marked
    # in its lane between the epoch that germinated it and the first it trained in.
    stages_seen = []
    for row, slot_id in enumerate(slots):
        y = len(slots) - 1 - row
        for record in records:
            stage = slot_field(record, slot_id, "stage")
            colour = STAGE_COLOURS.get(stage or "")
            if colour is not None:
                ax_stages.broken_barh([(record.epoch - 0.5, 1.0)], (y - 0.4, 0.8), color=colour, lw=0)
                if stage not in stages_seen:
                    stages_seen.append(stage)
            if slot_field(record, slot_id, "stage_after") not in (None, "NONE") and stage == "NONE":
                ax_stages.plot([record.epoch + 0.5] * 2, [y - 0.45, y + 0.45], color=GERMINATION_COLOUR, ls=":", lw=2)
    ax_stages.set_yticks(range(len(slots)), list(reversed(slots)), fontsize=8)
    ax_stages.set_ylim(-0.6, len(slots) - 0.4)
    ax_stages.set_ylabel("stage")
    _mark_rollbacks(axes, records)

    _accuracy_panel(ax_acc, records, chance, baseline=False)
    handles, _ = ax_acc.get_legend_handles_labels()
    handles += [Patch(color=STAGE_COLOURS[s], label=s.lower()) for s in stages_seen]
    if any(r.rollback for r in records):
        handles.append(Line2D([], [], color=ROLLBACK_COLOUR, ls="--", label="governor rollback"))
    ax_acc.legend(handles=handles, loc="best", fontsize=8, ncol=2, framealpha=0.85)

    _loss_panel(ax_loss, records, task_type)

    for slot_id in slots:
        xs, ys = _alpha_path(epochs, [slot_field(r, slot_id, "alpha_start") for r in records],
                             [slot_field(r, slot_id, "alpha") for r in records])
        ax_alpha.plot(xs, ys, color=colour_of[slot_id], label=slot_id)
    ax_alpha.set_ylim(-0.05, 1.05)
    ax_alpha.set_ylabel("alpha")
    ax_alpha.legend(loc="best", fontsize=7, ncol=min(len(slots), 3), framealpha=0.85)

    width = 0.8 / len(slots)
    for i, slot_id in enumerate(slots):
        offsets = [e - 0.4 + width * (i + 0.5) for e in epochs]
        values = [_number(slot_field(r, slot_id, "shapley")) for r in records]
        errors = [_number(slot_field(r, slot_id, "shapley_error")) for r in records]
        drawn = [(x, v, 0.0 if math.isnan(e) else e) for x, v, e in zip(offsets, values, errors) if not math.isnan(v)]
        if drawn:
            xs, vs, es = zip(*drawn)
            ax_shapley.bar(xs, vs, width=width, color=colour_of[slot_id], label=slot_id,
                           yerr=es if any(es) else None, capsize=2)
    ax_shapley.axhline(0, color="black", lw=0.8)
    ax_shapley.set_ylabel("Shapley value\n(points)")
    if ax_shapley.get_legend_handles_labels()[0]:
        ax_shapley.legend(loc="best", fontsize=7, ncol=min(len(slots), 3), framealpha=0.85)


def plot_log(log_path: str | Path, png_path: str | Path) -> Path:
    """Redraws a run's plot from its ``metrics.jsonl`` into ``png_path`` (written to a
    temporary file, then renamed: a reader never sees half a PNG). ValueError when the log
    holds no epoch."""
    log = read_log(log_path)
    records = read_epoch_records(log_path)
    if not records:
        raise ValueError(f"{log_path} holds no epoch record yet")
    config = next((r for r in log if r.get("type") == "config"), {})
    summary = next((r for r in reversed(log) if r.get("type") == "summary"), None)
    if summary is None:
        what = f"in progress, {len(records)} epochs"
    elif summary.get("status", "finished") == "finished":
        what = summary.get("seed_outcome", "")
    else:
        what = f"stopped after epoch {records[-1].epoch}"
    png_path = Path(png_path)
    temporary = png_path.with_name(f".{png_path.name}.{os.getpid()}.tmp")
    try:
        plot_run(records, temporary, title=f"{config.get('task', '?')} on {config.get('device', '?')}: {what}",
                 chance=config.get("chance_accuracy"), task_type=config.get("task_type", "classification"))
        os.replace(temporary, png_path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return png_path
