"""Checkpoints and resume: a run stopped anywhere (SIGTERM in the middle of an epoch, SIGINT
between epochs, SIGKILL with no clean-up) and resumed ends with exactly the records of a
run that was never stopped; checkpoints are plain ``torch.load(weights_only=True)`` data
that a process without esper_fast reads; the lifecycle objects survive the round trip."""

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from esper_fast import train
from esper_fast.train import checkpoint, cli
from cli_helpers import one_line_error, outcome, read_log, run_cli

# Six epochs reach the keep/cull decision: germinate after 1, TRAINING 2, BLENDING 3 (the
# alpha ramp moves every step), SHADOWING 4, PROBATIONARY 5.
LIFECYCLE = ["--epochs", "6", "--max-batches", "3", "--batch-size", "32", "--no-progress"]
# A rollback in epoch 2 (the seed is culled), then host epochs.
ROLLBACK = ["--epochs", "4", "--inject-nan-at", "2", "--max-batches", "3", "--batch-size", "32", "--no-progress"]
# A run folder written by an earlier esper_fast (checkpoint format version 1), kept as it was
# written: `esper-fast train --task cifar10 --device cpu --epochs 4 --max-batches 2
# --batch-size 8 --keep-checkpoints 1 --no-progress --out run` stopped by SIGTERM after step 1
# of epoch 3 (ESPER_FAST_SELF_SIGNAL=SIGTERM@3:1); its lock file and plot left out.
EARLIER_RUN = Path(__file__).parent / "data" / "legacy_run"


def child(argv, cwd, signal_at=None, **kwargs):
    env = {k: v for k, v in os.environ.items() if k not in ("ESPER_FAST_REFERENCE", "ESPER_FAST_SELF_SIGNAL")}
    if signal_at:
        env["ESPER_FAST_SELF_SIGNAL"] = signal_at
    return subprocess.run([sys.executable, "-m", "esper_fast", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=180, **kwargs)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """An empty folder to run in: no ./data, so the generated image set is used."""
    return tmp_path_factory.mktemp("resume")


def _in_process(workdir, argv):
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        patch.delenv("ESPER_FAST_REFERENCE", raising=False)
        return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def uninterrupted(workdir):
    """The outcomes of the two runs never stopped."""
    found = {}
    for name, flags in (("lifecycle", LIFECYCLE), ("rollback", ROLLBACK)):
        out = workdir / f"uninterrupted-{name}"
        assert _in_process(workdir, ["train", *flags, "--out", out]) == 0
        found[name] = outcome(out)
    return found


def test_sigterm_in_the_middle_of_an_epoch_then_resume_ends_as_if_never_stopped(workdir, uninterrupted):
    out = workdir / "sigterm"
    stopped = child(["train", *LIFECYCLE, "--out", str(out)], workdir, signal_at="SIGTERM@3:1")
    assert stopped.returncode == 143, stopped.stderr
    # One line saying how to continue; the summary and the plot were written on the way out.
    assert stopped.stderr.strip().splitlines()[-1].endswith(f"continue with: esper-fast train --resume {out}")
    # It says where it stopped: inside epoch 3, after its first step (3 steps an epoch).
    assert "stopped by SIGTERM after 2 of 6 epochs and 1 of 3 steps of epoch 3 (checkpoint " in stopped.stderr
    log = read_log(out / train.METRICS_FILE)
    assert [r["epoch"] for r in log if r["type"] == "epoch"] == [1, 2]
    assert log[-1]["type"] == "summary" and log[-1]["status"] == "interrupted" and log[-1]["stopped_by"] == "SIGTERM"
    assert (out / train.PLOT_FILE).is_file()
    status = json.loads((out / train.STATUS_FILE).read_text())
    assert status["status"] == "interrupted" and (status["epochs_done"], status["steps_done"]) == (2, 1)
    assert sorted(p.name for p in (out / train.CHECKPOINT_DIR).iterdir()) == ["epoch-0002-step-0001.pt", "epoch-0002.pt"]

    resumed = child(["train", "--resume", str(out)], workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert "resume: from" in resumed.stdout and "at epoch 3, step 2 of 6 epochs" in resumed.stdout
    assert outcome(out) == uninterrupted["lifecycle"]
    # The log tells the whole story: each epoch once, and where the run was resumed.
    log = read_log(out / train.METRICS_FILE)
    assert [r["type"] for r in log] == ["config", "epoch", "epoch", "resume"] + ["epoch"] * 4 + ["summary"]
    assert log[3]["stopped_by"] == "SIGTERM" and (log[3]["epochs_done"], log[3]["steps_done"]) == (2, 1)
    assert json.loads((out / train.STATUS_FILE).read_text())["status"] == "finished"


def test_sigint_between_epochs_after_a_rollback_then_resume(workdir, uninterrupted, capsys):
    out = workdir / "sigint"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ESPER_FAST_SELF_SIGNAL", "SIGINT@3:0")
        assert _in_process(workdir, ["train", *ROLLBACK, "--out", out]) == 130
    err = capsys.readouterr().err
    assert "stopped by SIGINT after 2 of 4 epochs" in err and "--resume" in err
    # Nothing of epoch 3 ran: the checkpoint after epoch 2 (the rollback) is where it resumes.
    assert [p.name for p in (out / train.CHECKPOINT_DIR).iterdir()] != []
    assert train.RunDir(out).checkpoints()[-1].name == "epoch-0002.pt"
    assert _in_process(workdir, ["train", "--resume", out]) == 0
    assert outcome(out) == uninterrupted["rollback"]


def test_a_killed_run_resumes_from_its_last_checkpoint(workdir, uninterrupted):
    out = workdir / "sigkill"
    killed = child(["train", *LIFECYCLE, "--out", str(out)], workdir, signal_at="SIGKILL@5:2")
    assert killed.returncode == -signal.SIGKILL
    assert json.loads((out / train.STATUS_FILE).read_text())["status"] == "running"  # no clean-up happened
    assert train.RunDir(out).checkpoints()[-1].name == "epoch-0004.pt"
    # A new run may not take the folder over; resuming it may.
    assert _in_process(workdir, ["train", *LIFECYCLE, "--out", out]) == cli.EXIT_USAGE
    assert _in_process(workdir, ["train", "--resume", out]) == 0
    assert outcome(out) == uninterrupted["lifecycle"]
    resume = next(r for r in read_log(out / train.METRICS_FILE) if r["type"] == "resume")
    assert resume["stopped_by"] == "a crash" and resume["epochs_done"] == 4


def test_a_run_folder_written_by_an_earlier_version_plots_and_resumes(workdir, capsys, monkeypatch):
    monkeypatch.delenv("ESPER_FAST_REFERENCE", raising=False)
    out = workdir / "earlier"
    shutil.copytree(EARLIER_RUN, out)
    before = read_log(out / train.METRICS_FILE)
    code, stdout, err = run_cli(capsys, "plot", out)
    assert code == 0 and stdout.strip() == f"plot: {out / train.PLOT_FILE}", err

    code, stdout, err = run_cli(capsys, "train", "--resume", out)
    assert code == 0, err
    assert f"resume: from {out / train.CHECKPOINT_DIR / 'epoch-0002-step-0001.pt'} at epoch 3, step 2 of 4 epochs" in stdout
    log = read_log(out / train.METRICS_FILE)
    assert [r["type"] for r in log] == ["config", "epoch", "epoch", "resume", "epoch", "epoch", "summary"]
    assert log[:3] == before[:3]  # the records written before are kept as they were
    assert log[3]["stopped_by"] == "SIGTERM" and (log[3]["epochs_done"], log[3]["steps_done"]) == (2, 1)
    # The epochs written now have the keys, in the order, of the epochs written then.
    assert all(list(r) == list(before[1]) for r in log if r["type"] == "epoch")
    assert [r["epoch"] for r in log if r["type"] == "epoch"] == [1, 2, 3, 4]
    assert log[-1]["status"] == "finished" and log[-1]["epochs"] == 4
    assert json.loads((out / train.STATUS_FILE).read_text())["status"] == "finished"
    (out / train.PLOT_FILE).unlink()
    assert run_cli(capsys, "plot", out)[0] == 0 and (out / train.PLOT_FILE).is_file()


def test_a_failed_run_resumed_to_its_end_is_then_described_in_full(workdir, capsys, monkeypatch):
    monkeypatch.delenv("ESPER_FAST_REFERENCE", raising=False)
    out = workdir / "failed"
    at_step = train.StopSignals.at_step

    def fail_in_epoch_2(self, epoch, steps_done):
        if (epoch, steps_done) == (2, 1):
            raise RuntimeError("injected failure")
        return at_step(self, epoch, steps_done)

    with monkeypatch.context() as patch:
        patch.setattr(train.StopSignals, "at_step", fail_in_epoch_2)
        with pytest.raises(RuntimeError, match="injected failure"):
            cli.main(["train", "--epochs", "3", "--max-batches", "2", "--batch-size", "8", "--no-progress",
                      "--out", str(out)])
    capsys.readouterr()
    started = json.loads((out / train.STATUS_FILE).read_text())
    assert started["status"] == "failed" and started["error"] == "RuntimeError: injected failure"

    assert run_cli(capsys, "train", "--resume", out)[0] == 0
    resume = next(r for r in read_log(out / train.METRICS_FILE) if r["type"] == "resume")
    assert resume["stopped_by"] == "an error" and resume["epochs_done"] == 1
    # run.json still says what the run is, as it did before the failure; the error is history.
    status = json.loads((out / train.STATUS_FILE).read_text())
    for key in ("task", "epochs", "started_at", "world_size"):
        assert status[key] == started[key], key
    assert status["status"] == "finished" and status["epochs_done"] == 3 and "error" not in status
    code, _, err = run_cli(capsys, "train", "--resume", out)
    one_line_error(code, err, f"{out} holds a finished run (cifar10, 3 epochs, finished {status['updated_at']})")


def test_a_checkpoint_loads_with_weights_only_in_a_process_without_esper_fast(workdir, uninterrupted):
    path = train.RunDir(workdir / "uninterrupted-lifecycle").checkpoints()[-1]
    script = (
        "import sys, torch\n"
        f"ck = torch.load({str(path)!r}, weights_only=True)\n"
        "assert 'esper_fast' not in sys.modules, 'loading needed esper_fast'\n"
        "print(ck['position'], sorted(ck['optimizers']), len(ck['model']['tensors']))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "{'epochs_done': 6, 'steps_done': 0}" in result.stdout


def test_the_seed_state_survives_the_plain_data_round_trip():
    from collections import deque

    from esper_fast.kasmina.isolation import AlphaSchedule
    from esper_fast.kasmina.slot import SeedMetrics, SeedState
    from esper_fast.leyline import SeedStage

    state = SeedState(seed_id="seed-1", blueprint_id="conv_light", slot_id="block2", stage=SeedStage.BLENDING,
                      previous_stage=SeedStage.TRAINING, previous_epochs_in_stage=2, alpha=0.37,
                      metrics=SeedMetrics(epochs_total=3, current_val_accuracy=41.5, counterfactual_contribution=None))
    state.stage_history.append((SeedStage.TRAINING, datetime.datetime(2025, 1, 2, 3, 4, 5, 678, datetime.timezone.utc)))
    extra = {"seed_state": state, "alpha_schedule": AlphaSchedule(total_steps=6, temperature=0.5)}
    plain = checkpoint.encode(extra)

    def is_plain(value):
        if isinstance(value, dict):
            return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(is_plain(v) for v in value)
        return value is None or isinstance(value, (bool, int, float, str, torch.Tensor))

    assert is_plain(plain)
    back = checkpoint.decode(plain)
    restored = back["seed_state"]
    assert restored == state and isinstance(restored.stage, SeedStage) and isinstance(restored.stage_history, deque)
    assert restored.stage_history.maxlen == state.stage_history.maxlen
    assert restored.telemetry == state.telemetry and restored.stage_entered_at == state.stage_entered_at
    schedule = back["alpha_schedule"]
    assert [schedule(s) for s in range(8)] == [extra["alpha_schedule"](s) for s in range(8)]
    with pytest.raises(TypeError, match="cannot hold"):
        checkpoint.encode(object())


def test_a_checkpoint_of_another_run_is_refused_and_the_run_s_own_resumed(workdir, capsys, monkeypatch):
    """A checkpoint knows its run (its log's config record: the start, the settings, the
    data); resume skips a stranger for the run's own older checkpoint, and refuses in one line
    a folder with none of its own."""
    monkeypatch.delenv("ESPER_FAST_REFERENCE", raising=False)
    tiny = ["--epochs", "4", "--max-batches", "2", "--batch-size", "8", "--no-progress"]
    other, own = workdir / "stranger-one-slot", workdir / "stranger-two-slots"
    assert run_cli(capsys, "train", *tiny, "--out", other)[0] == 0
    monkeypatch.setenv("ESPER_FAST_SELF_SIGNAL", "SIGTERM@3:0")
    assert run_cli(capsys, "train", *tiny, "--slots", "block2_post,block3_post", "--out", own)[0] == 143
    monkeypatch.delenv("ESPER_FAST_SELF_SIGNAL")
    stranger = own / train.CHECKPOINT_DIR / "epoch-0004.pt"
    shutil.copy(other / train.CHECKPOINT_DIR / "epoch-0004.pt", stranger)

    # With nothing of its own, the folder is refused as it is.
    alone = workdir / "stranger-alone"
    shutil.copytree(own, alone)
    for path in (alone / train.CHECKPOINT_DIR).iterdir():
        if path.name != stranger.name:
            path.unlink()
    log_before = (alone / train.METRICS_FILE).read_bytes()
    code, _, err = run_cli(capsys, "train", "--resume", alone)
    one_line_error(code, err, f"{alone / train.CHECKPOINT_DIR / stranger.name} is a checkpoint of another run "
                              "(one started at ")
    assert "holds no checkpoint of its own run to resume from" in err
    assert (alone / train.METRICS_FILE).read_bytes() == log_before

    # With its own, the run resumes from its newest, saying once which it skipped.
    code, stdout, err = run_cli(capsys, "train", "--resume", own)
    assert code == 0, err
    assert err.strip().splitlines() == [
        f"warning: {stranger} is a checkpoint of another run (one started at "
        f"{read_log(other / train.METRICS_FILE)[0]['started_at']}, this folder's at "
        f"{read_log(own / train.METRICS_FILE)[0]['started_at']}): skipped it, resuming from "
        f"{own / train.CHECKPOINT_DIR / 'epoch-0002.pt'}"]
    assert f"resume: from {own / train.CHECKPOINT_DIR / 'epoch-0002.pt'} at epoch 3 of 4 epochs" in stdout
    summary = read_log(own / train.METRICS_FILE)[-1]
    assert summary["status"] == "finished" and summary["slots"] == {"block2_post": "conv_light",
                                                                     "block3_post": "conv_light"}
