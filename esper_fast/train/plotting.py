"""The run plot: accuracy, loss (perplexity for a language model), alpha and the seed's
contribution per epoch, over coloured lifecycle bands, with germinations and rollbacks marked.

Reads the epoch records a run writes to ``metrics.jsonl`` (see
:class:`~esper_fast.train.report.EpochRecord`), so ``esper-fast plot DIR`` redraws a run's
plot from its log alone.
"""

from __future__ import annotations

import math
import os
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
# What the contribution panel measures, said on the plot so that nobody reads it as the gain
# over a host trained without the seed.
CONTRIBUTION_NOTE = (
    "contribution = validation accuracy with the seed minus with alpha forced to 0, measured on the "
    "host it co-adapted with (not the gain over a host trained without it)"
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


def plot_run(records: Sequence[EpochRecord | Mapping], path: str | Path, title: str = "",
             chance: float | None = None, task_type: str = "classification") -> Path:
    """Draws the run to a PNG at ``path``: four panels sharing the epoch axis. ``records``
    are :class:`EpochRecord` objects or the epoch dicts of a log (a missing value is not drawn).

    1. validation / train accuracy (and the alpha=0 baseline where attribution ran),
    2. train and validation loss; for ``task_type="lm"`` their perplexity, log scale,
    3. the blend alpha over each epoch (start to end),
    4. the counterfactual seed contribution (percentage points), with what it measures.
    Every panel carries the stage bands; germinations are green dotted lines (between the
    epoch that germinated and the first the seed trained in), rollbacks red dashed lines.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    records = [r if isinstance(r, EpochRecord) else EpochRecord.from_log(r) for r in records]
    epochs = [r.epoch for r in records]
    fig, (ax_acc, ax_loss, ax_alpha, ax_contrib) = plt.subplots(
        4, 1, figsize=(9, 10.5), sharex=True, gridspec_kw={"height_ratios": [3, 2, 1.2, 1.5]}
    )
    try:
        stages_seen = []
        germinations = _germinations(records)
        for ax in (ax_acc, ax_loss, ax_alpha, ax_contrib):
            for record in records:
                colour = STAGE_COLOURS.get(record.stage or "")
                if colour is not None:
                    ax.axvspan(record.epoch - 0.5, record.epoch + 0.5, color=colour, alpha=0.55, lw=0)
                    if record.stage not in stages_seen:
                        stages_seen.append(record.stage)
            for record in records:
                if record.rollback:
                    ax.axvline(record.epoch, color=ROLLBACK_COLOUR, ls="--", lw=1.5)
            for epoch, _ in germinations:
                ax.axvline(epoch + 0.5, color=GERMINATION_COLOUR, ls=":", lw=2)
        for epoch, seed_id in germinations:
            ax_acc.annotate(f"{seed_id} germinated", (epoch + 0.5, 1.0), xycoords=("data", "axes fraction"),
                            xytext=(3, -12), textcoords="offset points", fontsize=8, color=GERMINATION_COLOUR)

        ax_acc.plot(epochs, [_number(r.val_accuracy) for r in records], "o-", color="#1f77b4", label="validation")
        ax_acc.plot(epochs, [_number(r.train_accuracy) for r in records], "s--", color="#7f7f7f", ms=4, label="train (first batches)")
        baseline = [_number(r.baseline_accuracy) for r in records]
        if any(not math.isnan(b) for b in baseline):
            ax_acc.plot(epochs, baseline, "x", color="#9467bd", ms=7, label="validation, alpha forced to 0")
        if chance is not None:
            ax_acc.axhline(chance, color="#bbbbbb", lw=1, ls=":", label="chance")
        ax_acc.set_ylabel("accuracy (%)")
        ax_acc.set_ylim(bottom=0)
        handles, labels = ax_acc.get_legend_handles_labels()
        handles += [Patch(color=STAGE_COLOURS[s], alpha=0.55, label=s.lower()) for s in stages_seen]
        if germinations:
            handles.append(Line2D([], [], color=GERMINATION_COLOUR, ls=":", lw=2, label="germination"))
        if any(r.rollback for r in records):
            handles.append(Line2D([], [], color=ROLLBACK_COLOUR, ls="--", label="governor rollback"))
        ax_acc.legend(handles=handles, loc="best", fontsize=8, ncol=2, framealpha=0.85)
        ax_acc.set_title(title or "esper-fast run")

        train_loss = [_number(r.train_loss) for r in records]
        val_loss = [_number(r.val_loss) for r in records]
        if task_type == "lm":
            # exp overflows past ~700 nats; such a loss is off any useful perplexity scale.
            def perplexity(loss):
                return math.exp(min(loss, 50.0)) if math.isfinite(loss) else math.nan

            ax_loss.plot(epochs, [perplexity(x) for x in train_loss], "s--", color="#7f7f7f", ms=4, label="train (mean of steps)")
            ax_loss.plot(epochs, [perplexity(x) for x in val_loss], "o-", color="#1f77b4", label="validation")
            ax_loss.set_yscale("log")
            ax_loss.set_ylabel("perplexity")
        else:
            ax_loss.plot(epochs, train_loss, "s--", color="#7f7f7f", ms=4, label="train (mean of steps)")
            ax_loss.plot(epochs, val_loss, "o-", color="#1f77b4", label="validation")
            ax_loss.set_ylabel("loss")
        ax_loss.legend(loc="best", fontsize=8, framealpha=0.85)

        # Alpha moves within an epoch while blending: draw each epoch from its start to its end value.
        xs, ys = [], []
        for r in records:
            end = _number(r.alpha)
            xs += [r.epoch - 0.5, r.epoch + 0.5]
            ys += [end if r.alpha_start is None else float(r.alpha_start), end]
        ax_alpha.plot(xs, ys, color="#ff7f0e")
        ax_alpha.set_ylim(-0.05, 1.05)
        ax_alpha.set_ylabel("alpha")

        contrib = [_number(r.seed_contribution) for r in records]
        colours = ["#2ca02c" if c >= 0 else "#d62728" for c in contrib]
        ax_contrib.bar(epochs, [0.0 if math.isnan(c) else c for c in contrib], color=colours, width=0.6)
        ax_contrib.axhline(0, color="black", lw=0.8)
        ax_contrib.set_ylabel("seed contribution\n(points)")
        ax_contrib.set_xlabel("epoch")
        ax_contrib.set_xticks(epochs)

        fig.tight_layout(rect=(0, 0.035, 1, 1))
        fig.text(0.01, 0.008, CONTRIBUTION_NOTE, fontsize=7, color="#444444", wrap=True)
        path = Path(path)
        fig.savefig(path, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path


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
