"""The esper-fast command line: end-to-end runs on a tiny budget, the governor demo, the log
schema, the plot, the controller's decisions, help and version, and the one-line errors
for every bad flag. Run folders, checkpoints and resume: test_run_dir.py, test_resume.py."""

import math
import os
import subprocess
import sys

import pytest
import torch

from esper_fast import train
from esper_fast.kasmina import SeedStage
from esper_fast.train import cli
from esper_fast.train.plotting import plot_run, read_epoch_records
from cli_helpers import read_log, run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EPOCH_KEYS = {
    "type": str, "epoch": int, "stage": str, "stage_after": str, "alpha": float, "lr": float,
    "val_loss": float, "val_accuracy": float, "train_accuracy": float, "rollback": bool,
    "events": list, "steps": int, "epoch_time_s": float,
}
TINY = ["--max-batches", "3", "--batch-size", "32", "--no-progress"]


@pytest.fixture
def no_cifar(tmp_path, monkeypatch):
    """Run from an empty folder so ./data holds no CIFAR-10 and the generated set is used."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------- end to end

def test_train_end_to_end_writes_log_and_plot(no_cifar, capsys, monkeypatch):
    monkeypatch.delenv("ESPER_FAST_REFERENCE", raising=False)
    out = no_cifar / "run"
    code, stdout, err = run_cli(capsys, "train", "--epochs", 2, "--out", out, *TINY)
    assert code == 0, err
    assert "generated offline set" in stdout
    assert "epoch  1/2" in stdout and "epoch  2/2" in stdout
    assert "seed outcome:" in stdout and "kernels ran" in stdout

    records = read_log(out / train.METRICS_FILE)
    assert [r["type"] for r in records] == ["config", "epoch", "epoch", "summary"]
    config, epochs, summary = records[0], records[1:3], records[3]
    assert config["task"] == "cifar10" and config["blueprint"] == "conv_light"
    assert config["data_source"] == "synthetic-cifar10" and config["steps_per_epoch"] == 3
    # What a researcher needs to reproduce it: the command, versions, device, start time.
    assert config["command"].startswith("esper-fast train --epochs 2 --out ")
    assert config["versions"]["torch"] == torch.__version__ and config["versions"]["esper_fast"]
    assert config["device_name"].startswith("cpu") and config["started_at"].endswith("+00:00")
    assert config["batch_size"] == 32 and config["lr"] == 0.05  # resolved defaults are recorded
    for record in epochs:
        for key, kind in EPOCH_KEYS.items():
            assert isinstance(record[key], kind), (key, record[key])
        assert 0.0 <= record["val_accuracy"] <= 100.0 and 0.0 <= record["alpha"] <= 1.0
        assert record["steps"] == 3 and math.isfinite(record["train_loss"])
        assert set(record["per_class_accuracy"]) == {str(c) for c in range(10)}
        assert record["started_at"] <= record["ended_at"]  # wall-clock timestamps, ISO 8601 UTC
    # One host epoch, then the seed germinates and incubates (alpha 0, STE).
    assert epochs[0]["stage"] == "NONE" and epochs[0]["stage_after"] == "TRAINING"
    assert any("germinated seed-1 (conv_light)" in e for e in epochs[0]["events"])
    assert epochs[1]["stage"] == "TRAINING" and epochs[1]["seed_id"] == "seed-1" and epochs[1]["alpha"] == 0.0
    assert summary["rollbacks"] == 0 and summary["epochs"] == 2 and summary["chance_accuracy"] == 10.0
    assert summary["status"] == "finished"
    assert summary["seeds"][0]["seed_id"] == "seed-1"
    # The traced steps saw the fused kernels: STE while incubating, metrics, snapshot.
    assert {"ste_forward", "metrics_update", "snapshot_pack"} <= set(summary["kernels_ran"])

    png = (out / train.PLOT_FILE).read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    assert len(read_epoch_records(out / train.METRICS_FILE)) == 2


def test_injected_nan_rolls_back_culls_the_seed_and_finishes(no_cifar, capsys):
    out = no_cifar / "nan"
    code, stdout, err = run_cli(capsys, "train", "--epochs", 3, "--inject-nan-at", 2, "--out", out, *TINY)
    assert code == 0, err
    records = read_log(out / train.METRICS_FILE)
    epochs = [r for r in records if r["type"] == "epoch"]
    summary = records[-1]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]  # the run carried on to the end
    hit = epochs[1]
    assert hit["rollback"] is True and hit["stage"] == "TRAINING" and hit["stage_after"] == "NONE"
    assert any("NaN injected" in e for e in hit["events"])
    assert any("governor rollback" in e for e in hit["events"])
    assert any("seed-1 culled: governor_rollback" in e for e in hit["events"])
    assert hit["train_loss"] is None  # NaN is written as null
    # The rollback restored finite weights: the next epoch trains normally.
    assert epochs[2]["rollback"] is False and math.isfinite(epochs[2]["train_loss"])
    assert math.isfinite(epochs[2]["val_loss"])
    assert summary["rollbacks"] == 1
    assert summary["seeds"][0]["outcome"] == "culled" and summary["seeds"][0]["reason"] == "governor_rollback"
    assert "governor rollback" in stdout and "governor rollbacks: 1" in stdout
    assert (out / train.PLOT_FILE).read_bytes().startswith(PNG_MAGIC)


def test_reference_mode_runs_the_original_algorithms(no_cifar, capsys, monkeypatch):
    monkeypatch.setenv("ESPER_FAST_REFERENCE", "1")
    out = no_cifar / "reference"
    code, stdout, err = run_cli(capsys, "train", "--epochs", 2, "--out", out, *TINY)
    assert code == 0, err
    summary = read_log(out / train.METRICS_FILE)[-1]
    assert summary["reference_mode"] is True and summary["kernels_ran"] == {}
    assert "reference mode, the original pure-PyTorch algorithms ran" in stdout


@pytest.mark.cuda
def test_train_on_cuda_with_the_governor_demo(no_cifar, capsys, monkeypatch):
    monkeypatch.delenv("ESPER_FAST_REFERENCE", raising=False)
    out = no_cifar / "cuda"
    code, stdout, err = run_cli(capsys, "train", "--device", "cuda", "--epochs", 3, "--inject-nan-at", 3, "--out", out, *TINY)
    assert code == 0, err
    records = read_log(out / train.METRICS_FILE)
    config, summary = records[0], records[-1]
    assert config["device"] == "cuda" and len(records) == 5
    assert summary["rollbacks"] == 1 and summary["seeds"][0]["reason"] == "governor_rollback"
    assert {"ste_forward", "metrics_update", "snapshot_pack"} <= set(summary["kernels_ran"])
    assert math.isfinite(records[3]["val_loss"])
    assert (out / train.PLOT_FILE).read_bytes().startswith(PNG_MAGIC)


# ---------------------------------------------------------------- the controller

def _controller(epochs=8):
    from esper_fast.tolaria import create_model

    model = create_model("cifar10", "cpu")
    schedule = train.LifecycleSchedule.for_epochs(epochs)
    return model, train.SeedController(model, "conv_light", schedule, epochs, steps_per_epoch=4)


def _drive(controller, accuracies, contributions):
    """End epochs 1.. with the given accuracies; returns (stage after each epoch, events)."""
    stages, events = [], []
    for epoch, (accuracy, contribution) in enumerate(zip(accuracies, contributions), start=1):
        if controller.stage == SeedStage.BLENDING:
            for step in range(controller.steps_per_epoch):
                controller.before_blend_batch(step)
        events += controller.end_epoch(epoch, accuracy, contribution)
        stages.append(controller.stage.name if controller.stage is not None else "NONE")
    return stages, events


def test_controller_walks_the_lifecycle_and_fossilizes_a_helpful_seed():
    model, controller = _controller(epochs=8)
    stages, events = _drive(
        controller,
        accuracies=[30, 40, 45, 50, 55, 58, 60, 61],
        contributions=[None, None, None, 3.0, 4.0, 5.0, 6.0, 6.0],
    )
    assert stages == ["NONE", "TRAINING", "BLENDING", "BLENDING", "SHADOWING", "PROBATIONARY", "FOSSILIZED", "FOSSILIZED"]
    assert model.seed_slot.alpha == 1.0
    record = controller.seeds[0]
    assert (record.outcome, record.decided_epoch, record.contribution) == ("fossilized", 7, 6.0)
    assert any("fossilized" in e for e in events)


def test_controller_culls_a_seed_that_does_not_help():
    model, controller = _controller(epochs=8)
    stages, events = _drive(
        controller,
        accuracies=[30, 40, 45, 50, 55, 58, 60, 61],
        contributions=[None, None, None, 1.0, 0.5, 0.0, -2.0, None],
    )
    assert stages[5:7] == ["PROBATIONARY", "NONE"]
    assert controller.seeds[0].outcome == "culled" and controller.seeds[0].reason == "negative_counterfactual"
    assert model.seed_slot.state is None and any("culled: negative_counterfactual" in e for e in events)


def test_controller_waits_on_a_held_gate_then_culls():
    _, controller = _controller(epochs=8)
    # No accuracy gain while incubating: gate G2 holds the seed in TRAINING.
    stages, events = _drive(controller, [30, 40, 40, 40, 40, 40], [None] * 6)
    assert stages[:5] == ["NONE", "TRAINING", "TRAINING", "TRAINING", "NONE"]
    # The failed checks read as a list of names, not as Python's list.
    assert events.count("gate held TRAINING -> BLENDING (global_improvement_insufficient_0.00%)") == 3
    assert controller.seeds[0].reason == "gate_timeout"


def test_blending_alpha_ramps_per_step():
    model, controller = _controller(epochs=8)
    _drive(controller, [30, 40, 45], [None] * 3)
    assert controller.stage == SeedStage.BLENDING
    alphas = []
    for step in range(2 * controller.steps_per_epoch):
        controller.before_blend_batch(step)
        alphas.append(model.seed_slot.alpha)
    assert alphas == sorted(alphas) and 0.0 < alphas[0] < 0.5 < alphas[-1] and alphas[-1] == pytest.approx(1.0)


def test_short_runs_compress_the_schedule_but_still_decide():
    for epochs in (5, 6, 8, 12):
        s = train.LifecycleSchedule.for_epochs(epochs)
        assert s.max_warmup_epochs + s.lifecycle_epochs <= epochs, epochs
    assert train.LifecycleSchedule.for_epochs(8).blending_epochs == 2


def test_loss_watch_records_each_step_and_poisons_one():
    watch = train.LossWatch(torch.nn.CrossEntropyLoss(), "cpu")
    watch.begin_epoch(2, poison_step=2)
    logits, labels = torch.randn(4, 3, requires_grad=True), torch.tensor([0, 1, 2, 1])
    losses = [watch(logits, labels) for _ in range(4)]  # grows past the expected 2 steps
    recorded = watch.epoch_losses()
    assert len(recorded) == 4 and math.isnan(recorded[2]) and not math.isnan(recorded[3])
    assert recorded[0] == pytest.approx(losses[0].item())
    losses[2].backward()
    assert torch.isnan(logits.grad).all()


# ---------------------------------------------------------------- plot

def test_plot_is_a_png_with_bands_rollbacks_and_missing_values(tmp_path):
    records = [
        {"epoch": 1, "stage": "NONE", "val_accuracy": 20.0, "train_accuracy": 22.0, "alpha": 0.0},
        {"epoch": 2, "stage": "TRAINING", "val_accuracy": 30.0, "train_accuracy": None, "alpha": 0.0},
        {"epoch": 3, "stage": "BLENDING", "val_accuracy": 35.0, "train_accuracy": 36.0, "alpha": 0.7,
         "seed_contribution": -1.5, "baseline_accuracy": 36.5, "rollback": True},
        {"epoch": 4, "stage": "FOSSILIZED", "val_accuracy": 40.0, "train_accuracy": 41.0, "alpha": 1.0,
         "seed_contribution": 4.0, "baseline_accuracy": 36.0},
    ]
    path = plot_run(records, tmp_path / "plot.png", title="t", chance=10.0)
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_plot_of_a_language_model_shows_perplexity(tmp_path):
    records = [
        {"epoch": 1, "stage": "NONE", "val_accuracy": 20.0, "alpha": 0.0, "train_loss": 5.0, "val_loss": 4.0,
         "events": ["germinated seed-1 (lora): warm-up over", "GERMINATED -> TRAINING"]},
        {"epoch": 2, "stage": "TRAINING", "val_accuracy": 25.0, "alpha": 0.0, "train_loss": None, "val_loss": "inf"},
    ]
    path = plot_run(records, tmp_path / "lm.png", title="lm", task_type="lm")
    assert path.read_bytes().startswith(PNG_MAGIC)


# ---------------------------------------------------------------- help and version

def test_train_help_shows_defaults_and_the_blueprints_of_each_task(capsys):
    code, out, _ = run_cli(capsys, "train", "--help")
    assert code == 0
    assert "(default: 8)" in out and "(default: cpu)" in out and "(default: runs/latest)" in out
    assert "cifar10 (cnn host):" in out and "conv_light (default)" in out
    assert "tinystories (transformer host):" in out and "lora (default)" in out
    assert "--resume DIR" in out and "--overwrite" in out and "--keep-checkpoints" in out


def test_version(capsys):
    import esper_fast

    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.startswith(f"esper-fast {esper_fast.__version__} (torch {torch.__version__}")


# ---------------------------------------------------------------- errors

def assert_one_line_error(code, err, *fragments):
    assert code == cli.EXIT_USAGE
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("esper-fast: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_unknown_task(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--task", "mnist", "--out", tmp_path)
    assert_one_line_error(code, err, "unknown task 'mnist'", "cifar10, tinystories")


def test_unknown_blueprint(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--blueprint", "lora", "--out", tmp_path)
    assert_one_line_error(code, err, "unknown blueprint 'lora'", "conv_light")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--device", "cuda", "--out", tmp_path)
    assert_one_line_error(code, err, "CUDA is not available")


def test_unwritable_out(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = run_cli(capsys, "train", "--out", blocker / "run")
    assert_one_line_error(code, err, "is not a writable folder")


def test_missing_data_root(capsys, tmp_path):
    code, out, err = run_cli(capsys, "train", "--data-root", tmp_path / "nowhere", "--out", tmp_path / "run")
    assert_one_line_error(code, err, "CIFAR-10 not found under --data-root")
    assert "epoch" not in out


def test_bad_arguments_are_one_line_too(capsys):
    code, _, err = run_cli(capsys, "train", "--epochs", "0")
    assert_one_line_error(code, err, "--epochs", "positive int")
    code, _, err = run_cli(capsys, "frobnicate")
    assert_one_line_error(code, err, "invalid choice")


def test_nan_epoch_after_the_run_is_rejected(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--epochs", "2", "--inject-nan-at", "3", "--out", tmp_path)
    assert_one_line_error(code, err, "--inject-nan-at 3")


@pytest.fixture
def text_files(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "story.txt").write_text("Once upon a time. " * 200, encoding="utf-8")
    (tmp_path / "run").mkdir()
    return tmp_path


BAD_FLAGS = [
    (["--lr", "nan"], "finite positive number"),
    (["--lr", "inf"], "finite positive number"),
    (["--lr", "-0.1"], "finite positive number"),
    (["--lr", "0"], "finite positive number"),
    (["--seed", "99999999999999999999999"], "a seed is an integer from 0 to 2**64-1"),
    (["--seed", "-1"], "a seed is an integer from 0 to 2**64-1"),
    (["--seed", "1.5"], "expected an integer seed"),
    (["--out", ""], "expected a folder name"),
    (["--epochs", "0"], "positive int"),
    (["--batch-size", "0"], "positive int"),
    (["--max-batches", "-2"], "positive int"),
    (["--keep-checkpoints", "0"], "positive int"),
    (["--seq-len", "32"], "--seq-len applies to --task tinystories, not cifar10"),
    (["--text", "{dir}/story.txt"], "--text applies to --task tinystories, not cifar10"),
    (["--task", "tinystories", "--data-root", "{dir}"], "--data-root applies to --task cifar10"),
    (["--task", "tinystories", "--text", "{dir}/empty.txt"], "is empty"),
    (["--task", "tinystories", "--text", "{dir}/missing.txt"], "text file not found"),
    (["--task", "tinystories", "--text", "{dir}"], "is not a file"),
    (["--task", "tinystories", "--seq-len", "1000"], "exceeds the model's block size 256"),
    (["--task", "tinystories", "--blueprint", "conv_light"], "unknown blueprint 'conv_light' for tinystories"),
    (["--device", "tpu"], "device"),
    (["--resume", "{dir}/run", "--lr", "0.1"], "--resume continues a run with the settings it started with; drop --lr"),
    (["--resume", "{dir}/run", "--overwrite"], "drop --overwrite"),
    (["--resume", "{dir}/nowhere"], "no such run folder"),
    (["--resume", "{dir}/run"], "nothing to resume"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_every_bad_flag_is_one_line_and_exit_2(capsys, text_files, flags, message):
    flags = [f.replace("{dir}", str(text_files)) for f in flags]
    out = [] if any(f in flags for f in ("--out", "--resume")) else ["--out", str(text_files / "out")]
    code, stdout, err = run_cli(capsys, "train", *flags, *out)
    assert_one_line_error(code, err, message)
    assert "epoch" not in stdout
    assert not (text_files / "out" / train.METRICS_FILE).exists()


# ---------------------------------------------------------------- info and the module entry point

def test_info_lists_versions_kernels_and_the_reference_switch(capsys, monkeypatch):
    monkeypatch.delenv("ESPER_FAST_REFERENCE", raising=False)
    code, out, _ = run_cli(capsys, "info")
    assert code == 0
    assert f"torch {torch.__version__}" in out
    assert "kernels compiled for cpu:" in out and "kernels compiled for cuda:" in out
    assert "reference switch: off" in out
    monkeypatch.setenv("ESPER_FAST_REFERENCE", "1")
    _, out, _ = run_cli(capsys, "info")
    assert "reference switch: ON" in out


def test_the_console_script_is_the_cli():
    import importlib

    tomllib = pytest.importorskip("tomllib")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as handle:
        target = tomllib.load(handle)["project"]["scripts"]["esper-fast"]
    module, function = target.split(":")
    assert getattr(importlib.import_module(module), function) is cli.main


def test_python_dash_m_runs_the_cli():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-m", "esper_fast", "train", "--task", "nope"],
        cwd=root, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == cli.EXIT_USAGE
    assert result.stderr.strip() == "esper-fast: error: unknown task 'nope'; choose one of: cifar10, tinystories"
