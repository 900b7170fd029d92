"""The run plot reads at a glance whatever the number of slots: a title of at most three
lines, above the panels, that says how the run stands (a run killed outright is not "in
progress"); legends beside their panels, never over a curve; equal alpha curves drawn side
by side, each slot with a dash and marker of its own; every germination, cull and
fossilization marked in its slot's lane. The logic is tested here, not pixels."""

import fcntl
import json
import os

import pytest

from esper_fast.train import plotting
from esper_fast.train.plotting import draw_run, fates, plot_log, run_title
from esper_fast.train.report import EpochRecord
from esper_fast.train.run_dir import LOCK_FILE, METRICS_FILE, STATUS_FILE

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CIFAR_SLOTS = ["block2_post", "block3_post"]
LM_SLOTS = [f"layer_{i}_post_block" for i in range(6)]
# One seed's life, epoch by epoch: (stage as it trained, stage after the decision, alpha at the end).
LIFE = [("NONE", "NONE", 0.0), ("NONE", "TRAINING", 0.0), ("TRAINING", "BLENDING", 0.0),
        ("BLENDING", "BLENDING", 0.5), ("BLENDING", "SHADOWING", 1.0), ("SHADOWING", "PROBATIONARY", 1.0)]
CONFIG = {"type": "config", "task": "tinystories", "device": "cpu", "epochs": 8, "steps_per_epoch": 50,
          "task_type": "lm", "chance_accuracy": None}


def several(slot_ids, culled=()):
    """Records of a run in which every slot lives the same life (equal alpha curves); at
    epoch 7 the seeds of ``culled`` are culled and the others fossilized, then one more epoch."""
    records = []
    start = 0.0
    for epoch, (stage, after, alpha) in enumerate(LIFE + [("PROBATIONARY", None, 1.0), (None, None, None)], 1):
        slots = {}
        for i, slot_id in enumerate(slot_ids):
            if epoch == 7:
                after = "NONE" if slot_id in culled else "FOSSILIZED"
            if epoch == 8:
                stage = after = "NONE" if slot_id in culled else "FOSSILIZED"
                alpha = 0.0 if slot_id in culled else 1.0
            seeded = stage != "NONE"
            slots[slot_id] = {"stage": stage, "stage_after": after, "seed_id": f"seed-{i + 1}" if seeded else None,
                              "blueprint": "lora" if seeded else None, "alpha_start": start, "alpha": alpha,
                              "shapley": 1.5 * (i + 1) if stage in ("BLENDING", "SHADOWING", "PROBATIONARY") else None}
        start = alpha  # the same for every slot
        main = slots[slot_ids[0]]
        records.append(EpochRecord.from_log({
            "epoch": epoch, "stage": main["stage"], "stage_after": main["stage_after"], "alpha": main["alpha"],
            "val_accuracy": 20.0 + epoch, "train_accuracy": 21.0 + epoch, "train_loss": 3.0 - 0.1 * epoch,
            "val_loss": 3.1 - 0.1 * epoch, "events": [], "rollback": False, "epoch_time_s": 1.0, "slots": slots}))
    return records


def one_slot():
    return [EpochRecord.from_log({"epoch": epoch, "stage": stage, "stage_after": after, "alpha": alpha,
                                  "val_accuracy": 20.0 + epoch, "events": [], "rollback": False})
            for epoch, (stage, after, alpha) in enumerate(LIFE + [("PROBATIONARY", "NONE", 1.0)], 1)]


@pytest.fixture
def figure():
    import matplotlib.pyplot as plt

    made = []

    def draw(*args, **kwargs):
        fig = draw_run(*args, **kwargs)
        fig.canvas.draw()
        made.append(fig)
        return fig

    yield draw
    for fig in made:
        plt.close(fig)


# ---------------------------------------------------------------- what happened, where

def test_the_fates_of_the_seeds_are_read_from_the_stages():
    found = fates(several(CIFAR_SLOTS, culled={"block3_post"}))
    assert found == [("block2_post", 2, "germinated"), ("block3_post", 2, "germinated"),
                     ("block2_post", 7, "fossilized"), ("block3_post", 7, "culled")]
    assert fates(one_slot()) == [(None, 2, "germinated"), (None, 7, "culled")]


@pytest.mark.parametrize("slot_ids", [CIFAR_SLOTS, LM_SLOTS[:5], LM_SLOTS], ids=["2 slots", "5 slots", "6 slots"])
def test_culls_and_fossilizations_are_marked_in_each_slots_lane_and_each_seed_named(figure, slot_ids):
    culled = set(slot_ids[1::2])
    fig = figure(several(slot_ids, culled=culled), "t", task_type="lm")
    lanes = fig.axes[2]
    lane_of = {label.get_text(): y for y, label in zip(lanes.get_yticks(), lanes.get_yticklabels())}
    assert set(lane_of) == set(slot_ids)
    marks = {(line.get_marker(), float(line.get_xdata()[0]), float(line.get_ydata()[0]))
             for line in lanes.get_lines() if line.get_marker() in ("X", "*")}
    assert marks == {("X" if slot_id in culled else "*", 7.5, lane_of[slot_id]) for slot_id in slot_ids}
    named = {(text.get_text(), text.get_position()[1]) for text in lanes.texts}
    assert named == {(f"seed-{i + 1}", lane_of[slot_id]) for i, slot_id in enumerate(slot_ids)}
    legend = [text.get_text() for text in lanes.get_legend().get_texts()]
    assert {"germination", "culled" if culled else "fossilized", "fossilized"} <= set(legend)


@pytest.mark.parametrize("slot_ids", [[], CIFAR_SLOTS], ids=["1 slot", "2 slots"])
@pytest.mark.parametrize("task_type", ["classification", "lm"])
def test_the_note_under_the_panels_says_what_the_seed_is_judged_by(figure, slot_ids, task_type):
    fig = figure(several(slot_ids) if slot_ids else one_slot(), "t", task_type=task_type)
    note = " ".join(fig.texts[-1].get_text().split())
    if task_type == "lm":
        assert note.startswith("loss Shapley value = " if slot_ids else "loss drop = "), note
        assert "validation loss" in note and "nats" in note and "accuracy" not in note, note
    else:
        assert note.startswith("Shapley value = the seed's mean gain in validation accuracy" if slot_ids
                               else "contribution = validation accuracy with the seed"), note


def test_a_one_slot_plot_marks_the_cull_on_its_alpha(figure):
    fig = figure(one_slot(), "t")
    marks = [(line.get_marker(), float(line.get_xdata()[0])) for line in fig.axes[2].get_lines()
             if line.get_marker() == "X"]
    assert marks == [("X", 7.5)]


@pytest.mark.parametrize("slot_ids", [CIFAR_SLOTS, LM_SLOTS[:5], LM_SLOTS], ids=["2 slots", "5 slots", "6 slots"])
def test_equal_alpha_curves_stay_visible(figure, slot_ids):
    fig = figure(several(slot_ids), "t", task_type="lm")
    lines = [line for line in fig.axes[3].get_lines() if line.get_linestyle() != "None"]
    assert len(lines) == len(slot_ids)
    # Every slot's alpha is the same; each line is shifted from the one before, in a colour
    # of its own.
    firsts = [line.get_ydata()[0] for line in lines]
    assert all(b - a == pytest.approx(plotting.ALPHA_OFFSET) for a, b in zip(firsts, firsts[1:]))
    assert len({line.get_color() for line in lines}) == len(slot_ids)
    markers = [line for line in fig.axes[3].get_lines() if line.get_linestyle() == "None"]
    assert len({line.get_marker() for line in markers}) == len(slot_ids)
    # The markers of an epoch sit side by side, not on each other, each on its line.
    assert len({float(line.get_xdata()[0]) for line in markers}) == len(slot_ids)
    for line, mark in zip(lines, markers):
        assert float(mark.get_ydata()[0]) == pytest.approx(float(line.get_ydata()[1]))  # flat: alpha 0
        ramp = 3  # epoch 4 blends from 0 to 0.5: the marker lies on the line
        x0, x1, y0, y1 = (float(v) for v in (*line.get_xdata()[2 * ramp:2 * ramp + 2], *line.get_ydata()[2 * ramp:2 * ramp + 2]))
        x, y = float(mark.get_xdata()[ramp]), float(mark.get_ydata()[ramp])
        assert x0 < x <= x1 and y == pytest.approx(y0 + (y1 - y0) * (x - x0) / (x1 - x0))


# ---------------------------------------------------------------- legends and title

@pytest.mark.parametrize("slot_ids", [[], CIFAR_SLOTS, LM_SLOTS[:5], LM_SLOTS], ids=["1 slot", "2", "5", "6"])
def test_legends_sit_beside_their_panels_and_the_title_above_them(figure, slot_ids):
    records = several(slot_ids) if slot_ids else one_slot()
    long_outcome = "; ".join(f"{s}: seed-{i} (lora) culled at epoch 7: negative_shapley" for i, s in enumerate(LM_SLOTS))
    fig = figure(records, f"tinystories on cpu: finished\n{long_outcome}", task_type="lm")
    renderer = fig.canvas.get_renderer()
    legends = 0
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is not None:
            legends += 1
            assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1
            # ... and within the figure.
            assert legend.get_window_extent(renderer).x1 <= fig.bbox.x1
    assert legends >= (4 if slot_ids else 2)
    title = fig._suptitle
    assert len(title.get_text().splitlines()) <= plotting.TITLE_LINES
    assert title.get_window_extent(renderer).y0 >= max(ax.get_tightbbox(renderer).y1 for ax in fig.axes)
    assert title.get_window_extent(renderer).y1 <= fig.bbox.y1


def test_a_title_is_at_most_three_lines_and_names_no_outcome_per_slot():
    records = several(LM_SLOTS, culled={"layer_1_post_block"})
    summary = {"status": "finished", "seed_outcome": "; ".join(f"{s}: seed-1 (lora) still live" for s in LM_SLOTS)}
    assert run_title(CONFIG, records, summary) == (
        "tinystories on cpu, 6 slots: finished, 8 epochs\n"
        "seeds: 6 germinated, 5 fossilized, 1 culled (see the stage lanes)")
    one = run_title({**CONFIG, "task": "cifar10"}, one_slot(), {"status": "finished",
                                                                "seed_outcome": "seed-1 (conv_light) culled at epoch 7"})
    assert one == "cifar10 on cpu: finished, 7 epochs\nseed-1 (conv_light) culled at epoch 7"
    long = run_title(CONFIG, one_slot(), {"status": "finished", "seed_outcome": "x " * 400})
    assert len(long.splitlines()) == 3 and long.endswith("...")
    assert max(len(line) for line in long.splitlines()) <= plotting.TITLE_WIDTH


def test_the_title_says_how_the_run_stands():
    records = one_slot()[:3]
    stopped = {"status": "interrupted", "stopped_by": "SIGTERM", "seed_outcome": "seed-1 (lora) still live"}
    assert run_title(CONFIG, records, stopped, position=(3, 8)).splitlines()[0] == (
        "tinystories on cpu: stopped by SIGTERM after 3 of 8 epochs and 8 of 50 steps of epoch 4")
    assert run_title(CONFIG, records, stopped, status={"epochs_done": 3, "steps_done": 0}).splitlines()[0] == (
        "tinystories on cpu: stopped by SIGTERM after 3 of 8 epochs")
    running = {"status": "running", "epochs_done": 3, "steps_done": 0}
    assert run_title(CONFIG, records, None, status=running, running=True) == (
        "tinystories on cpu: in progress, 3 of 8 epochs done")
    killed = run_title(CONFIG, records, None, status=running, running=False)
    assert killed.replace("\n", " ") == (
        "tinystories on cpu: unfinished at 3 of 8 epochs: no summary, and no process runs it (killed or crashed)")
    failed = {"status": "failed", "epochs_done": 2, "steps_done": 0, "error": "RunWriteError: could not write run.json"}
    assert run_title(CONFIG, records, None, status=failed) == (
        "tinystories on cpu: failed after 2 of 8 epochs\nRunWriteError: could not write run.json")
    assert "in progress, or ended without one" in run_title(CONFIG, records, None)


def _write_run(folder, records, status):
    folder.mkdir()
    lines = [CONFIG] + [r.to_log() for r in records]
    (folder / METRICS_FILE).write_text("".join(json.dumps(line) + "\n" for line in lines))
    (folder / STATUS_FILE).write_text(json.dumps(status))
    (folder / LOCK_FILE).write_text("pid 1 on host: esper-fast train\n")


def test_esper_fast_plot_of_a_run_killed_outright_does_not_call_it_in_progress(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    _write_run(folder, several(CIFAR_SLOTS)[:4], {"status": "running", "epochs_done": 4, "steps_done": 0})
    titles = []
    draw = plotting.plot_run
    monkeypatch.setattr(plotting, "plot_run", lambda records, path, title, **kw: titles.append(title) or
                        draw(records, path, title, **kw))
    png = plot_log(folder / METRICS_FILE, tmp_path / "killed.png")
    assert png.read_bytes().startswith(PNG_MAGIC)
    assert titles[-1].startswith("tinystories on cpu, 2 slots: unfinished at 4 of 8 epochs: no summary")
    # While a process holds the run's lock, it is in progress.
    fd = os.open(folder / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        plot_log(folder / METRICS_FILE, tmp_path / "running.png")
    finally:
        os.close(fd)
    assert titles[-1].startswith("tinystories on cpu, 2 slots: in progress, 4 of 8 epochs done")
