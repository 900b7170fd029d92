"""esper-fast train with several seed slots (``--slots``): a run of the task's default slot is
the run it always was (the same records and checkpoints, bit for bit); several slots run a
lifecycle each under one controller per slot, each seed judged by its Shapley value; the
log, console line, summary and plot say so per slot; a governor rollback culls every live
seed; checkpoints of version 2 resume to the same records as a run never stopped; and every
bad --slots or --blueprint is refused in one line."""

import dataclasses
import math

import pytest
import torch

from esper_fast import train
from esper_fast.kasmina import SeedStage
from esper_fast.tolaria import create_model
from esper_fast.tolaria.attribution import plan_attribution, attribute
from esper_fast.train import checkpoint, cli
from esper_fast.train.console import epoch_lines
from esper_fast.train.controller import LifecycleSchedule, SlotControllers
from esper_fast.train.plotting import plot_run
from esper_fast.train.report import EpochRecord, seed_interactions, seed_values
from cli_helpers import CLOCK, in_process, one_line_error, outcome, read_log, run_cli

TINY = ["--max-batches", "3", "--batch-size", "32", "--no-progress"]
# Seven epochs reach the keep/cull decision of both seeds: germinate after 1, TRAINING 2,
# BLENDING 3-4 (the ramps move every step in 3), SHADOWING 5, PROBATIONARY 6.
TWO_SLOTS = ["--slots", "block3_post,block2_post", "--blueprint", "depthwise,conv_light", "--epochs", "7", *TINY]
# A rollback in epoch 5 culls both seeds; twelve epochs leave room for both slots to germinate again.
ROLLBACK = ["--slots", "block2_post,block3_post", "--epochs", "12", "--inject-nan-at", "5", *TINY]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """An empty folder to run in: no ./data, so the generated image set is used."""
    return tmp_path_factory.mktemp("slots")



@pytest.fixture(scope="module")
def two_slots(workdir):
    out = workdir / "two"
    assert in_process(workdir, ["train", *TWO_SLOTS, "--out", out]) == 0
    return out


@pytest.fixture(scope="module")
def rollback(workdir):
    out = workdir / "rollback"
    assert in_process(workdir, ["train", *ROLLBACK, "--out", out]) == 0
    return out


def epochs_of(out):
    return [r for r in read_log(out / train.METRICS_FILE) if r["type"] == "epoch"]


def _payload(path):
    return torch.load(path, weights_only=True)


def _without_clock(value):
    if isinstance(value, dict):
        return {k: _without_clock(v) for k, v in value.items() if k not in CLOCK | {"out", "command"}}
    if isinstance(value, list):
        return [_without_clock(v) for v in value]
    return value


def _same_payload(a, b, where=""):
    """Two checkpoint payloads hold the same keys in the same order and the same values bit for
    bit, but the wall clock, the folder and Python's and numpy's generators (the run never
    seeds them)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            if key not in CLOCK | {"out", "command", "python", "numpy", "iso", "elapsed_s"}:
                _same_payload(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same_payload(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), (where, a, b)


# ---------------------------------------------------------------- the default slot is today's run

def test_naming_the_default_slot_is_the_run_without_slots(workdir):
    flags = ["--epochs", "6", "--keep-checkpoints", "10", *TINY]
    plain, named = workdir / "plain", workdir / "named"
    assert in_process(workdir, ["train", *flags, "--out", plain]) == 0
    assert in_process(workdir, ["train", *flags, "--slots", "block2_post", "--out", named]) == 0
    first, second = read_log(plain / train.METRICS_FILE), read_log(named / train.METRICS_FILE)
    # Every record with the same keys in the same order, the same values but the wall clock.
    assert [list(r) for r in first] == [list(r) for r in second]
    assert _without_clock(first) == _without_clock(second)
    assert "slots" not in first[0] and all("slots" not in r and "interactions" not in r for r in first)
    assert "slot" not in first[-1]["seeds"][0] and "slots" not in first[-1]
    checkpoints = train.RunDir(plain).checkpoints()
    assert [p.name for p in checkpoints] == [p.name for p in train.RunDir(named).checkpoints()]
    for path in checkpoints:
        saved = _payload(path)
        assert saved["version"] == 1 and list(saved["optimizers"]) == ["host", "seed"]
        assert isinstance(saved["model"]["isolate_gradients"], bool) and "slots" not in saved["config"]
        _same_payload(saved, _payload(named / train.CHECKPOINT_DIR / path.name), path.name)


def test_one_other_slot_is_a_run_of_one_slot_there_with_a_version_2_checkpoint(workdir):
    out = workdir / "block3"
    assert in_process(workdir, ["train", "--slots", "block3_post", "--epochs", "3", *TINY, "--out", out]) == 0
    log = read_log(out / train.METRICS_FILE)
    assert log[0]["slots"] == ["block3_post"]
    assert all("slots" not in r for r in log[1:])  # one slot: the records of a run of one slot
    assert log[-1]["seeds"][0]["seed_id"] == "seed-1" and "slot" not in log[-1]["seeds"][0]
    saved = _payload(train.RunDir(out).checkpoints()[-1])
    # An earlier esper-fast would build the default slot; version 2 makes it refuse instead.
    assert saved["version"] == 2 and list(saved["controller"]) == ["slots"]
    assert list(saved["controller"]["slots"]) == ["block3_post"]
    assert any(k.startswith("host.slots.block3_post.seed.") for k in saved["model"]["tensors"])
    assert not any(k.startswith("host.slots.block2_post.") for k in saved["model"]["tensors"])


# ---------------------------------------------------------------- several slots end to end

def test_two_slots_run_a_lifecycle_each_judged_by_its_shapley_value(two_slots, capsys):
    log = read_log(two_slots / train.METRICS_FILE)
    config, summary = log[0], log[-1]
    # The slots and their blueprints are recorded in the host's order, whatever the flag's order.
    assert config["slots"] == ["block2_post", "block3_post"] and config["blueprint"] == "conv_light,depthwise"
    epochs = [r for r in log if r["type"] == "epoch"]
    for record in epochs:
        assert list(record["slots"]) == ["block2_post", "block3_post"]
        main = record["slots"]["block2_post"]
        # The fields of a run of one slot speak of the main slot.
        assert (record["stage"], record["stage_after"], record["alpha"]) == (main["stage"], main["stage_after"],
                                                                             main["alpha"])
    lanes = {s: [r["slots"][s]["stage"] for r in epochs] for s in ("block2_post", "block3_post")}
    # Both slots germinate after the same epoch and walk the lifecycle side by side.
    assert lanes["block2_post"][:6] == lanes["block3_post"][:6] == [
        "NONE", "TRAINING", "BLENDING", "BLENDING", "SHADOWING", "PROBATIONARY"]
    assert epochs[0]["events"][0] == "block2_post: germinated seed-1 (conv_light): warm-up over"
    assert "block3_post: germinated seed-2 (depthwise): warm-up over" in epochs[0]["events"]
    assert epochs[1]["slots"]["block3_post"]["seed_id"] == "seed-2"
    assert epochs[1]["slots"]["block3_post"]["shapley"] is None  # TRAINING: alpha 0, not in the forward

    for record in epochs[2:6]:  # both seeds blended in: both measured, exactly (two seeds)
        a, b = record["slots"]["block2_post"], record["slots"]["block3_post"]
        assert "shapley_error" not in a and "shapley_error" not in b
        # Efficiency: the values add up to f(both) - f(none) = loo(a) + alone(b) = loo(b) + alone(a).
        assert a["shapley"] + b["shapley"] == pytest.approx(a["leave_one_out"] + b["alone_on"], abs=1e-9)
        assert a["shapley"] + b["shapley"] == pytest.approx(b["leave_one_out"] + a["alone_on"], abs=1e-9)
        # The main slot's single counterfactual is its leave-one-out, measured another way.
        assert record["real_accuracy"] - record["baseline_accuracy"] == pytest.approx(a["leave_one_out"], abs=1e-9)
        # The record's contribution is the value the main slot's seed is judged by.
        assert record["seed_contribution"] == a["shapley"]
        pair = record["interactions"]["block2_post+block3_post"]
        assert pair == pytest.approx(a["leave_one_out"] - a["alone_on"], abs=1e-9)

    decided = epochs[5]
    for slot_id in ("block2_post", "block3_post"):
        slot = decided["slots"][slot_id]
        assert slot["stage_after"] == ("FOSSILIZED" if slot["shapley"] > 0 else "NONE"), slot
    seeds = {s["slot"]: s for s in summary["seeds"]}
    assert [s["seed_id"] for s in summary["seeds"]] == ["seed-1", "seed-2"]
    for slot_id, seed in seeds.items():
        value = decided["slots"][slot_id]["shapley"]
        assert seed["decided_epoch"] == 6 and seed["contribution"] == value
        assert seed["outcome"] == ("fossilized" if value > 0 else "culled")
        assert seed["reason"] == (f"Shapley value {value:+.2f} points" if value > 0 else "negative_shapley")
    assert summary["slots"] == {"block2_post": "conv_light", "block3_post": "depthwise"}
    assert summary["seed_outcome"].startswith("block2_post: seed-1 (conv_light) ")
    assert "; block3_post: seed-2 (depthwise) " in summary["seed_outcome"]
    assert (two_slots / train.PLOT_FILE).read_bytes().startswith(PNG_MAGIC)
    (two_slots / train.PLOT_FILE).unlink()
    code, stdout, err = run_cli(capsys, "plot", two_slots)  # redrawn from the log alone
    assert code == 0 and stdout.strip() == f"plot: {two_slots / train.PLOT_FILE}", err
    assert (two_slots / train.PLOT_FILE).read_bytes().startswith(PNG_MAGIC)


def test_the_console_shows_every_slot(workdir, capsys):
    out = workdir / "console"
    code, stdout, err = run_cli(capsys, "train", "--slots", "block2_post,block3_post", "--epochs", "4", *TINY,
                                "--out", out)
    assert code == 0, err
    # Too wide for one line with both slots: the slots go on a line of their own.
    assert "\n  slots: block2_post (conv_light), block3_post (conv_light)\n" in stdout
    lines = stdout.splitlines()
    # Under the epoch's head line, a line per slot saying what each number is (its events
    # indented under it).
    at = next(i for i, line in enumerate(lines) if line.startswith("epoch  3/4 | "))
    end = next(i for i, line in enumerate(lines) if line.startswith("epoch  4/4 | "))
    slot_lines = [line for line in lines[at + 1:end] if not line.startswith("      ")]
    assert len(slot_lines) == 2
    assert slot_lines[0].startswith("  block2_post  seed-1  BLENDING      alpha 1.00  Shapley value ")
    assert slot_lines[1].startswith("  block3_post  seed-2  BLENDING      alpha 1.00  Shapley value ")
    assert all(len(line) <= 100 for line in lines if line.startswith(("epoch ", "  ")))  # the epochs' lines
    # The outcome would not fit 100 columns on one line: one slot's fates per line.
    assert ("seed outcomes:\n  block2_post: seed-1 (conv_light) still live\n"
            "  block3_post: seed-2 (conv_light) still live\n") in stdout


def test_a_rollback_culls_every_live_seed_and_both_slots_germinate_again(rollback):
    epochs = epochs_of(rollback)
    hit = epochs[4]
    assert hit["rollback"] is True and [hit["slots"][s]["stage"] for s in hit["slots"]] != ["NONE", "NONE"]
    assert "block2_post: seed-1 culled: governor_rollback" in hit["events"]
    assert "block3_post: seed-2 culled: governor_rollback" in hit["events"]
    assert [hit["slots"][s]["stage_after"] for s in ("block2_post", "block3_post")] == ["NONE", "NONE"]
    # The next epoch-end, a whole lifecycle still fits: each empty slot germinates again.
    again = epochs[5]["events"]
    assert any(e.startswith("block2_post: germinated seed-3 (conv_light)") for e in again), again
    assert any(e.startswith("block3_post: germinated seed-4 (conv_light)") for e in again), again
    summary = read_log(rollback / train.METRICS_FILE)[-1]
    assert [(s["seed_id"], s["slot"]) for s in summary["seeds"]] == [
        ("seed-1", "block2_post"), ("seed-2", "block3_post"), ("seed-3", "block2_post"), ("seed-4", "block3_post")]
    assert summary["rollbacks"] == 1 and all(s["decided_epoch"] is not None for s in summary["seeds"])


def test_a_tinystories_run_grows_seeds_after_two_transformer_layers(workdir):
    out = workdir / "lm"
    argv = ["train", "--task", "tinystories", "--slots", "layer_3_post_block,layer_1_post_block",
            "--blueprint", "lora", "--epochs", "3", "--max-batches", "1", "--batch-size", "2", "--seq-len", "16",
            "--no-progress", "--out", out]
    assert in_process(workdir, argv) == 0
    epochs = epochs_of(out)
    assert list(epochs[0]["slots"]) == ["layer_1_post_block", "layer_3_post_block"]
    assert [epochs[1]["slots"][s]["stage"] for s in epochs[1]["slots"]] == ["TRAINING", "TRAINING"]
    assert all(math.isfinite(r["val_loss"]) for r in epochs)


@pytest.mark.cuda
def test_two_slots_on_cuda_blend_then_roll_back_together(workdir):
    out = workdir / "cuda"
    # Four epochs: germinate after 1, TRAINING 2, BLENDING 3, where a NaN rolls back and culls both.
    argv = ["train", "--device", "cuda", "--slots", "block2_post,block3_post", "--epochs", "4",
            "--inject-nan-at", "3", *TINY, "--out", out]
    assert in_process(workdir, argv) == 0
    log = read_log(out / train.METRICS_FILE)
    epochs = [r for r in log if r["type"] == "epoch"]
    assert log[0]["device"] == "cuda" and len(epochs) == 4
    assert [epochs[1]["slots"][s]["stage"] for s in ("block2_post", "block3_post")] == ["TRAINING", "TRAINING"]
    hit = epochs[2]
    assert hit["rollback"] is True and [hit["slots"][s]["stage"] for s in hit["slots"]] == ["BLENDING", "BLENDING"]
    assert "block2_post: seed-1 culled: governor_rollback" in hit["events"]
    assert "block3_post: seed-2 culled: governor_rollback" in hit["events"]
    assert math.isfinite(epochs[3]["val_loss"])
    summary = log[-1]
    assert [s["reason"] for s in summary["seeds"]] == ["governor_rollback"] * 2
    assert {"blend_forward", "metrics_update", "snapshot_pack"} <= set(summary["kernels_ran"])


# ---------------------------------------------------------------- stop and resume

def test_a_two_slot_run_stopped_mid_ramp_resumes_to_the_same_records(workdir, two_slots):
    out = workdir / "two-stopped"
    assert in_process(workdir, ["train", *TWO_SLOTS, "--out", out], signal_at="SIGTERM@3:1") == 143
    saved = _payload(train.RunDir(out).checkpoints()[-1])
    assert saved["position"] == {"epochs_done": 2, "steps_done": 1} and saved["version"] == 2
    assert list(saved["controller"]["slots"]) == ["block2_post", "block3_post"]
    assert list(saved["optimizers"]["seeds"]) == ["block2_post", "block3_post"]
    assert set(saved["progress"]["alpha_starts"]) == {"block2_post", "block3_post"}
    assert saved["model"]["isolate_gradients"] == {"block2_post": False, "block3_post": False}
    assert in_process(workdir, ["train", "--resume", out]) == 0
    assert outcome(out) == outcome(two_slots)


def test_a_two_slot_run_stopped_between_epochs_after_a_rollback_resumes(workdir, rollback):
    out = workdir / "rollback-stopped"
    assert in_process(workdir, ["train", *ROLLBACK, "--out", out], signal_at="SIGINT@7:0") == 130
    assert train.RunDir(out).checkpoints()[-1].name == "epoch-0006.pt"
    assert in_process(workdir, ["train", "--resume", out]) == 0
    assert outcome(out) == outcome(rollback)


def test_a_checkpoint_of_a_newer_version_is_refused_by_name(tmp_path):
    payload = {"format": checkpoint.FORMAT, "version": checkpoint.VERSION + 1}
    with pytest.raises(checkpoint.ResumeError, match="written by a newer esper-fast train"):
        checkpoint.Checkpoint.from_payload(payload, tmp_path / "x.pt")
    with pytest.raises(checkpoint.ResumeError, match="is not a checkpoint"):
        checkpoint.Checkpoint.from_payload({"format": checkpoint.FORMAT, "version": 0}, tmp_path / "x.pt")


# ---------------------------------------------------------------- the controllers

def _controllers(slots=("block2_post", "block3_post"), epochs=12):
    from esper_fast.kasmina import MorphogeneticModel
    from esper_fast.runtime import get_task_spec

    spec = get_task_spec("cifar10")
    model = MorphogeneticModel(create_model(spec, "cpu").host, task_config=spec.task_config, slots=list(slots))
    schedule = LifecycleSchedule.for_epochs(epochs)
    return model, SlotControllers(model, dict.fromkeys(slots, "conv_light"), schedule, epochs, steps_per_epoch=2)


def _drive(controllers, accuracies, values, losses=None):
    """End epochs 1.. with the given accuracies, per-slot (value, error) and validation losses
    (None: none given); returns the events."""
    events = []
    losses = [None] * len(accuracies) if losses is None else losses
    for epoch, (accuracy, judged, loss) in enumerate(zip(accuracies, values, losses), start=1):
        for controller in controllers.by_slot.values():
            if controller.stage == SeedStage.BLENDING:
                for step in range(controller.steps_per_epoch):
                    controller.before_blend_batch(step)
        events += controllers.end_epoch(epoch, accuracy, judged, val_loss=loss)
    return events


def test_each_slot_is_decided_by_its_own_value_and_a_sampled_bound_must_clear_zero():
    model, controllers = _controllers(("block2_post", "block3_post"))
    live = {"block2_post": (4.0, 1.5), "block3_post": (1.0, 2.0)}  # block3's 95% bound reaches below 0
    # Germinated after epoch 3 (warm-up), TRAINING 4, BLENDING 5-6, SHADOWING 7, PROBATIONARY 8.
    events = _drive(controllers, [30, 40, 45, 50, 55, 58, 60, 61], [{}] * 4 + [live] * 4)
    first, second = controllers.by_slot["block2_post"], controllers.by_slot["block3_post"]
    assert first.stage == SeedStage.FOSSILIZED and second.stage is None
    assert first.seeds[0].reason == "Shapley value +4.00 +/- 1.50 points"
    assert first.seeds[0].contribution_error == 1.5
    assert second.seeds[0].reason == "uncertain_shapley"
    assert "block3_post: seed-2 culled: uncertain_shapley (Shapley value +1.00 +/- 2.00 points)" in events
    # Each slot's state is its own: the fossil keeps alpha 1, the culled slot is empty.
    assert model.slot("block2_post").alpha == 1.0 and model.slot("block3_post").state is None


def test_a_culled_slot_germinates_again_while_a_lifecycle_fits_and_seeds_are_numbered_in_order():
    _, controllers = _controllers(("block2_post", "block3_post"), epochs=14)
    judged = {"block2_post": (3.0, None), "block3_post": (-1.0, None)}
    events = _drive(controllers, [30, 40, 45, 50, 55, 58, 60, 61, 61.5], [{}] * 4 + [judged] * 4 + [{}])
    assert "block3_post: seed-2 culled: negative_shapley (Shapley value -1.00 points)" in events
    # Epoch 9 ends with 14 - 9 = 5 epochs left, a whole lifecycle: the empty slot germinates again.
    assert any(e.startswith("block3_post: germinated seed-3 (conv_light): ") for e in events), events
    assert [(s.seed_id, s.slot) for s in controllers.seeds] == [
        ("seed-1", "block2_post"), ("seed-2", "block3_post"), ("seed-3", "block3_post")]
    # The records carry the slot (several slots only); one slot's records stay as they were.
    assert controllers.seeds[0].to_log()["slot"] == "block2_post"
    _, single = _controllers(("block2_post",))
    _drive(single, [30, 40, 45], [{}] * 3)
    assert "slot" not in single.seeds[0].to_log() and single.seeds[0].seed_id == "seed-1"


def test_the_rollback_cull_names_every_live_seed():
    _, controllers = _controllers()
    _drive(controllers, [30, 40, 45], [{}, {}, {}])
    assert controllers.live
    events = controllers.cull_live(4, "governor_rollback")
    assert events == ["block2_post: seed-1 culled: governor_rollback", "block3_post: seed-2 culled: governor_rollback"]
    assert not controllers.live


# ---------------------------------------------------------------- sampled values in the record

def test_sampled_shapley_values_are_logged_with_their_bound_and_shown_on_the_line_and_plot(tmp_path):
    slots = ("layer_0", "layer_1", "layer_2", "layer_3", "layer_4")
    plan = plan_attribution(slots, slots, exact_max_slots=4, permutations=8)
    accuracy = {subset: 10.0 + 3.0 * len(subset) + (2.0 if "layer_0" in subset else 0.0) for subset in plan.subsets}
    sampled = attribute(plan, accuracy, {subset: 1.0 for subset in plan.subsets})
    assert not sampled.exact
    values = seed_values(sampled, list(slots[:4]))  # layer_4: not in the forward
    assert set(values) == set(slots[:4])
    for slot_id, value in values.items():
        assert value["shapley"] == sampled.accuracy.shapley[slot_id]
        assert value["shapley_error"] == sampled.accuracy.shapley_error[slot_id]
    assert values["layer_0"]["shapley"] == pytest.approx(5.0)  # additive: every order agrees, exactly

    def slot(stage, value):
        return {"stage": stage, "stage_after": stage, "seed_id": "seed-1", "blueprint": "lora", "alpha_start": 0.5,
                "alpha": 1.0, **value}

    record = EpochRecord.from_log({
        "epoch": 4, "stage": "BLENDING", "alpha": 1.0, "val_accuracy": 40.0, "train_accuracy": 41.0,
        "train_loss": 2.0, "epoch_time_s": 1.0, "events": [], "rollback": False,
        "slots": {"layer_0": slot("BLENDING", {"shapley": 5.0, "shapley_error": 0.25}),
                  "layer_1": slot("TRAINING", {"shapley": None})},
    })
    lines = epoch_lines(record, 6, "classification")
    assert lines[1:] == ["  layer_0  seed-1  BLENDING      alpha 1.00  Shapley value  +5.00 +/- 0.25 points",
                         "  layer_1  seed-1  TRAINING      alpha 1.00"]
    assert seed_interactions(sampled, list(slots[:4]))["layer_0+layer_1"] == pytest.approx(0.0)
    assert "layer_0+layer_4" not in seed_interactions(sampled, list(slots[:4]))
    path = plot_run([record, dataclasses.replace(record, epoch=5)], tmp_path / "p.png", title="t", task_type="lm")
    assert path.read_bytes().startswith(PNG_MAGIC)


# ---------------------------------------------------------------- the flags

@pytest.mark.parametrize("flags, message", [
    (["--slots", "block9_post"],
     "unknown slot 'block9_post' for cifar10 (CNNHost's injection points, after every block but the first); "
     "choose from: block2_post, block3_post"),
    (["--task", "tinystories", "--slots", "layer_0_post_block,layer_7_post_block"],
     "unknown slot 'layer_7_post_block' for tinystories (the transformer's injection points layer_{i}_post_block, "
     "after each layer); choose from: layer_0_post_block, layer_1_post_block"),
    (["--slots", "block3_post,block2_post,block3_post"], "--slots names block3_post twice"),
    (["--slots", "block2_post,,block3_post"], "expected names separated by commas"),
    (["--slots", ""], "expected names separated by commas"),
    (["--slots", "block2_post,block3_post", "--blueprint", "conv_light,norm,depthwise"],
     "--blueprint names 3 blueprints for 2 slot(s)"),
    (["--blueprint", "conv_light,norm"], "--blueprint names 2 blueprints for 1 slot(s)"),
    (["--slots", "block2_post,block3_post", "--blueprint", "conv_light,lora"],
     "unknown blueprint 'lora' for cifar10 (cnn host)"),
    (["--resume", "{dir}", "--slots", "block2_post"], "drop --slots"),
])
def test_bad_slots_and_blueprints_fail_in_one_line(capsys, tmp_path, flags, message):
    flags = [f.replace("{dir}", str(tmp_path)) for f in flags]
    out = [] if "--resume" in flags else ["--out", str(tmp_path / "run")]
    code, stdout, err = run_cli(capsys, "train", *flags, *out)
    one_line_error(code, err, message)
    assert "epoch" not in stdout and not (tmp_path / "run").exists()


def test_help_documents_slots_and_the_rules(capsys):
    code, out, _ = run_cli(capsys, "train", "--help")
    assert code == 0
    assert "--slots ID[,ID...]" in out and "--blueprint NAME[,NAME...]" in out
    assert "cifar10: block2_post (default), block3_post" in out
    assert "tinystories: layer_0_post_block (default), layer_1_post_block" in out
    assert "Shapley value" in out and "a governor rollback culls every live seed" in out
