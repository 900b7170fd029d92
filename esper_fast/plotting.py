"""The run plot: accuracy, alpha and seed contribution per epoch over coloured lifecycle bands.

Reads the epoch records the run loop writes to ``metrics.jsonl`` (see
:mod:`esper_fast.lifecycle`), so a plot can be redrawn from a finished run's log.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# Band colours per lifecycle stage; stages not listed (no seed) get no band.
STAGE_COLOURS = {
    "GERMINATED": "#c7c7c7",
    "TRAINING": "#9ecae1",
    "BLENDING": "#fdd0a2",
    "SHADOWING": "#dadaeb",
    "PROBATIONARY": "#fcbba1",
    "FOSSILIZED": "#a1d99b",
}


def read_epoch_records(path: str | Path) -> list[dict]:
    """The ``"epoch"`` records of a metrics JSONL file, in order."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if line:
                record = json.loads(line)
                if record.get("type") == "epoch":
                    records.append(record)
    return records


def _value(record: dict, key: str) -> float:
    value = record.get(key)
    return math.nan if value is None else float(value)


def plot_run(records: list[dict], path: str | Path, title: str = "", chance: float | None = None) -> Path:
    """Draws the run to a PNG at ``path``: three panels sharing the epoch axis.

    1. validation / train accuracy (and the alpha=0 baseline where attribution ran),
    2. the blend alpha over each epoch (start to end),
    3. the counterfactual seed contribution (percentage points).
    Every panel carries the stage bands; governor rollbacks are red dashed lines.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    epochs = [r["epoch"] for r in records]
    fig, (ax_acc, ax_alpha, ax_contrib) = plt.subplots(
        3, 1, figsize=(9, 8), sharex=True, gridspec_kw={"height_ratios": [3, 1.2, 1.5]}
    )
    try:
        stages_seen = []
        for ax in (ax_acc, ax_alpha, ax_contrib):
            for record in records:
                colour = STAGE_COLOURS.get(record.get("stage") or "")
                if colour is not None:
                    ax.axvspan(record["epoch"] - 0.5, record["epoch"] + 0.5, color=colour, alpha=0.55, lw=0)
                    if record["stage"] not in stages_seen:
                        stages_seen.append(record["stage"])
            for record in records:
                if record.get("rollback"):
                    ax.axvline(record["epoch"], color="#d62728", ls="--", lw=1.5)

        ax_acc.plot(epochs, [_value(r, "val_accuracy") for r in records], "o-", color="#1f77b4", label="validation")
        ax_acc.plot(epochs, [_value(r, "train_accuracy") for r in records], "s--", color="#7f7f7f", ms=4, label="train (first batches)")
        baseline = [_value(r, "baseline_accuracy") for r in records]
        if any(not math.isnan(b) for b in baseline):
            ax_acc.plot(epochs, baseline, "x", color="#9467bd", ms=7, label="validation, alpha forced to 0")
        if chance is not None:
            ax_acc.axhline(chance, color="#bbbbbb", lw=1, ls=":", label="chance")
        ax_acc.set_ylabel("accuracy (%)")
        ax_acc.set_ylim(bottom=0)
        handles, labels = ax_acc.get_legend_handles_labels()
        handles += [Patch(color=STAGE_COLOURS[s], alpha=0.55, label=s.lower()) for s in stages_seen]
        if any(r.get("rollback") for r in records):
            handles.append(matplotlib.lines.Line2D([], [], color="#d62728", ls="--", label="governor rollback"))
        ax_acc.legend(handles=handles, loc="best", fontsize=8, ncol=2, framealpha=0.85)
        ax_acc.set_title(title or "esper-fast run")

        # Alpha moves within an epoch while blending: draw each epoch from its start to its end value.
        xs, ys = [], []
        for r in records:
            end = _value(r, "alpha")
            xs += [r["epoch"] - 0.5, r["epoch"] + 0.5]
            ys += [end if r.get("alpha_start") is None else float(r["alpha_start"]), end]
        ax_alpha.plot(xs, ys, color="#ff7f0e")
        ax_alpha.set_ylim(-0.05, 1.05)
        ax_alpha.set_ylabel("alpha")

        contrib = [_value(r, "seed_contribution") for r in records]
        colours = ["#2ca02c" if c >= 0 else "#d62728" for c in contrib]
        ax_contrib.bar(epochs, [0.0 if math.isnan(c) else c for c in contrib], color=colours, width=0.6)
        ax_contrib.axhline(0, color="black", lw=0.8)
        ax_contrib.set_ylabel("seed contribution\n(points)")
        ax_contrib.set_xlabel("epoch")
        ax_contrib.set_xticks(epochs)

        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path
