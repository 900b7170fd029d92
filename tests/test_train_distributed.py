"""esper-fast train over several processes (CPU, gloo, 2 ranks): the lifecycle in lockstep
(the same stages on both ranks, matching checksums after every epoch), a NaN on rank 1 only
rolling both back, a stop and resume that ends bit for bit as the run never stopped (resumed
by the command it prints), stops and failures that show the one line of one process, both
command lines (``--nproc`` and ``torchrun`` by hand), validation over the ranks' shards
counting exactly what one process counts, and the one-line errors of the new flags.

Each run is a real torchrun job of 2 processes (10-20 s on 2 cores, most of it start-up), so
each is run once per module and several tests read it.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from esper_fast import train
from esper_fast.train import cli, datasets, launch
from esper_fast.train.ranks import Ranks, state_checksum
from cli_helpers import CLOCK, one_line_error, outcome, read_log, run_cli

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Six epochs reach the keep/cull decision (as in test_resume.py), 3 steps of 32 per rank.
LIFECYCLE = ["--epochs", "6", "--max-batches", "3", "--batch-size", "32", "--no-progress"]


def child(command, cwd, signal_at=None, **kwargs):
    env = {k: v for k, v in os.environ.items()
           if k not in ("ESPER_FAST_REFERENCE", "ESPER_FAST_SELF_SIGNAL", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if signal_at:
        env["ESPER_FAST_SELF_SIGNAL"] = signal_at
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, **kwargs)


def esper_fast(*argv):
    return [sys.executable, "-m", "esper_fast", *map(str, argv)]


def torchrun(*argv):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "esper_fast", *map(str, argv)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """An empty folder to run in: no ./data, so the generated image set is used."""
    return tmp_path_factory.mktemp("ddp")


@pytest.fixture(scope="module")
def lifecycle(workdir):
    """A whole lifecycle on 2 processes, launched by the shortcut."""
    out = workdir / "lifecycle"
    result = child(esper_fast("train", "--nproc", 2, *LIFECYCLE, "--out", out), workdir)
    assert result.returncode == 0, result.stderr
    return out, result


@pytest.fixture(scope="module")
def nan_on_rank_1(workdir):
    """A NaN in epoch 2 on rank 1 only, launched by torchrun by hand."""
    out = workdir / "nan"
    result = child(torchrun("train", "--epochs", 3, "--inject-nan-at", 2, "--inject-nan-rank", 1, *LIFECYCLE[2:],
                            "--out", out), workdir)
    assert result.returncode == 0, result.stderr
    return out, result


def epochs_of(out):
    return [r for r in read_log(out / train.METRICS_FILE) if r["type"] == "epoch"]


@pytest.fixture(scope="module")
def two_slots(workdir):
    """A lifecycle in each of two slots on 2 processes."""
    out = workdir / "slots"
    result = child(esper_fast("train", "--nproc", 2, "--slots", "block2_post,block3_post", "--blueprint",
                              "conv_light,depthwise", *LIFECYCLE[:1], "7", *LIFECYCLE[2:], "--out", out), workdir)
    assert result.returncode == 0, result.stderr
    return out


# ---------------------------------------------------------------- the lifecycle in lockstep

def test_two_ranks_walk_the_same_lifecycle_with_matching_checksums(lifecycle):
    out, _ = lifecycle
    epochs = epochs_of(out)
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4, 5, 6]
    for record in epochs:
        ranks = record["ranks"]
        assert [r["rank"] for r in ranks] == [0, 1]
        assert ranks[0]["checksum"] == ranks[1]["checksum"], record["epoch"]
        assert [r["stage"] for r in ranks] == [record["stage_after"]] * 2
        assert ranks[0]["alpha"] == ranks[1]["alpha"]
    assert len({r["ranks"][0]["checksum"] for r in epochs}) == 6  # the model moves every epoch
    stages = [r["stage"] for r in epochs]
    assert stages[:5] == ["NONE", "TRAINING", "BLENDING", "SHADOWING", "PROBATIONARY"]
    summary = read_log(out / train.METRICS_FILE)[-1]
    assert summary["seeds"][0]["outcome"] in ("fossilized", "culled") and summary["seeds"][0]["decided_epoch"] == 5


def test_rank_0_alone_prints_and_writes_and_the_summary_states_the_world_size(lifecycle):
    out, result = lifecycle
    lines = result.stdout.splitlines()
    for epoch in range(1, 7):
        assert sum(line.startswith(f"epoch  {epoch}/6 |") for line in lines) == 1  # once: rank 1 is silent
    assert sum(line.startswith("seed outcome:") for line in lines) == 1
    assert "2 processes (DDP over gloo, batch 32 per process)" in result.stdout
    assert "world size: 2 processes (torch.distributed gloo" in result.stdout
    records = read_log(out / train.METRICS_FILE)
    config, summary = records[0], records[-1]
    assert (config["world_size"], config["backend"]) == (2, "gloo")
    assert config["command"].startswith("esper-fast train --nproc 2 --epochs 6")  # as typed
    assert summary["world_size"] == 2 and summary["status"] == "finished"
    assert json.loads((out / train.STATUS_FILE).read_text())["world_size"] == 2
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoints", "metrics.jsonl", "metrics.png", "run.json"]
    # Each rank trains on its shard: 2 x 3 steps x 32 samples per epoch in the throughput.
    assert all(r["steps"] == 3 for r in epochs_of(out))


def test_two_ranks_take_every_slot_s_decisions_together(two_slots):
    epochs = epochs_of(two_slots)
    assert [r["epoch"] for r in epochs] == list(range(1, 8))
    for record in epochs:
        ranks = record["ranks"]
        assert ranks[0]["checksum"] == ranks[1]["checksum"], record["epoch"]
        assert ranks[0]["slots"] == ranks[1]["slots"], record["epoch"]
        assert {s: v["stage"] for s, v in ranks[0]["slots"].items()} == {
            s: v["stage_after"] for s, v in record["slots"].items()}
    assert [epochs[5]["slots"][s]["stage"] for s in ("block2_post", "block3_post")] == ["PROBATIONARY"] * 2
    summary = read_log(two_slots / train.METRICS_FILE)[-1]
    assert [(s["slot"], s["decided_epoch"]) for s in summary["seeds"]] == [("block2_post", 6), ("block3_post", 6)]
    assert summary["world_size"] == 2


# ---------------------------------------------------------------- the governor in lockstep

def test_a_nan_on_rank_1_only_rolls_back_both_ranks(nan_on_rank_1):
    out, result = nan_on_rank_1
    epochs = epochs_of(out)
    hit = epochs[1]
    assert hit["rollback"] is True and hit["stage"] == "TRAINING" and hit["stage_after"] == "NONE"
    assert "NaN injected at step 2 on rank 1" in hit["events"]
    assert any("governor rollback" in e for e in hit["events"])
    assert any("seed-1 culled: governor_rollback" in e for e in hit["events"])
    assert hit["train_loss"] is None  # the all-reduced loss is NaN on every rank
    for record in epochs:
        assert record["ranks"][0]["checksum"] == record["ranks"][1]["checksum"], record["epoch"]
        assert [r["stage"] for r in record["ranks"]] == [record["stage_after"]] * 2
    assert epochs[2]["rollback"] is False and epochs[2]["train_loss"] is not None
    summary = read_log(out / train.METRICS_FILE)[-1]
    assert summary["rollbacks"] == 1 and summary["seeds"][0]["reason"] == "governor_rollback"
    # The governor's line is printed once (by rank 0); rank 1's stdout goes nowhere.
    assert result.stdout.count("[GOVERNOR] CRITICAL INSTABILITY DETECTED") == 1


# ---------------------------------------------------------------- stop and resume

def test_a_stopped_two_rank_run_resumes_to_the_same_records(workdir, lifecycle, capsys):
    out = workdir / "stopped"
    stopped = child(esper_fast("train", "--nproc", 2, *LIFECYCLE, "--out", out), workdir, signal_at="SIGTERM@3:1")
    assert stopped.returncode == 143, stopped.stderr
    # Exactly what one process shows: one line that says how to continue; torchrun's report
    # of the ranks' exit statuses goes to the run folder's process log.
    resume_command = f"esper-fast train --resume {out}"
    assert stopped.stderr.splitlines() == [
        f"esper-fast: stopped by SIGTERM after 2 of 6 epochs and 1 of 3 steps of epoch 3 "
        f"(checkpoint {out / 'checkpoints'}/epoch-0002-step-0001.pt);"
        f" continue with: {resume_command}"]
    assert "ChildFailedError" in (out / launch.PROCESS_LOG).read_text()
    assert read_log(out / train.METRICS_FILE)[-1]["resume_command"] == resume_command
    status = json.loads((out / train.STATUS_FILE).read_text())
    assert status["status"] == "interrupted" and (status["epochs_done"], status["steps_done"]) == (2, 1)

    # The command shown is the whole command: --resume takes the run's own number of processes;
    # --nproc, if given, must be it.
    code, _, err = run_cli(capsys, "train", "--resume", out, "--nproc", 3)
    one_line_error(code, err, f"the run in {out} was started with 2 process(es); resume it with --nproc 2, "
                              "or leave --nproc out")
    resumed = child(esper_fast(*resume_command.split()[1:]), workdir)  # python -m esper_fast train --resume OUT
    assert resumed.returncode == 0, resumed.stderr
    assert "at epoch 3, step 2 of 6 epochs" in resumed.stdout
    assert "2 processes (DDP over gloo" in resumed.stdout
    assert outcome(out) == outcome(lifecycle[0])
    # run.json keeps the world size across sessions: a second stop resumes on 2 processes again.
    assert json.loads((out / train.STATUS_FILE).read_text())["world_size"] == 2


def test_resume_lists_nproc_among_the_flags_it_allows(capsys):
    code, stdout, _ = run_cli(capsys, "train", "--help")
    assert code == 0
    allowed = " ".join(stdout.split("\n  --resume DIR", 1)[1].split("\n  --seed", 1)[0].split())
    assert "as many processes as it started with" in allowed and "--nproc, which must be the run's" in allowed


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_a_launched_run_stops_it_with_one_line(workdir, sig):
    """SIGTERM or SIGINT to ``esper-fast train --nproc 2`` (as a terminal or a scheduler sends
    it): the ranks stop after the same step and the user sees the one line of one process."""
    out = workdir / f"signalled-{sig.name}"
    env = {k: v for k, v in os.environ.items()
           if k not in ("ESPER_FAST_REFERENCE", "ESPER_FAST_SELF_SIGNAL", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    launched = subprocess.Popen(esper_fast("train", "--nproc", 2, *LIFECYCLE, "--out", out), cwd=workdir, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in launched.stdout:
            if line.startswith("epoch  1/6"):
                launched.send_signal(sig)
                break
        stdout, stderr = launched.communicate(timeout=300)
    finally:
        launched.kill()
    assert launched.returncode == 128 + sig, stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith(f"esper-fast: stopped by {sig.name} after ") and stderr.rstrip().endswith(
        f"continue with: esper-fast train --resume {out}")
    assert json.loads((out / train.STATUS_FILE).read_text())["status"] == "interrupted"
    assert (out / launch.PROCESS_LOG).stat().st_size > 0


def test_a_write_failure_of_a_launched_run_is_one_line(workdir):
    """A file the run needs that cannot be written (here a file-size limit, as a full disk):
    exit 1 and the one error line of one process; the ranks' tracebacks go to the log."""
    import resource

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))  # the first checkpoint is about 60 kB

    out = workdir / "unwritable"
    result = child(esper_fast("train", "--nproc", 2, *LIFECYCLE, "--out", out), workdir, preexec_fn=small_files)
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"esper-fast: error: could not write {out / 'checkpoints'}/epoch-0000.pt (")
    assert result.stderr.rstrip().endswith("with no checkpoint to resume from; start it again with --overwrite")
    assert (out / launch.PROCESS_LOG).stat().st_size > 0


# ---------------------------------------------------------------- validation over shards

WORLD = 2
SHARD_DATA = {"synthetic_train": 96, "synthetic_test": 101, "batch_size": 16}  # 101: shards of 51 and 50


def _validate(loaders):
    from esper_fast.tolaria import create_model, validate_epoch

    torch.manual_seed(0)
    model = create_model("cifar10", "cpu")
    result = validate_epoch(model, loaders.trainloader, loaders.testloader, torch.nn.CrossEntropyLoss(), "cpu",
                            compute_per_class=True, attribution=False)
    return {"val_accuracy": result.val_accuracy, "per_class": [result.per_class_acc[c] for c in range(10)],
            "val_loss": result.val_loss}


def _shard_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        loaders = datasets.cifar10_loaders(rank=rank, world_size=WORLD, **SHARD_DATA)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump(_validate(loaders), handle)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_validation_over_the_ranks_shards_counts_exactly_what_one_process_counts(tmp_path):
    mp.spawn(_shard_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    whole = _validate(datasets.cifar10_loaders(**SHARD_DATA))
    for rank in ranks:
        assert rank["val_accuracy"] == whole["val_accuracy"]  # the exact count over all 101 images
        assert rank["per_class"] == whole["per_class"]
        # The loss is a mean of per-batch means, and the shards' batches are other batches.
        assert rank["val_loss"] == pytest.approx(whole["val_loss"], rel=0.05)
    assert ranks[0] == ranks[1]


def test_shards_hold_every_validation_sample_once_and_equal_training_steps():
    test_shards = [list(datasets.ShardSampler(range(101), rank, 2)) for rank in range(2)]
    assert sorted(test_shards[0] + test_shards[1]) == list(range(101))
    bundles = [datasets.cifar10_loaders(rank=r, world_size=3, **SHARD_DATA) for r in range(3)]
    assert len({len(b.trainloader) for b in bundles}) == 1  # DistributedSampler pads: equal steps
    assert [len(b.testloader.sampler.sampler) for b in bundles] == [34, 34, 33]
    assert all(b.shuffle_generator is None for b in bundles)  # the order is the seed and the epoch's
    first = [next(iter(b.trainloader))[1] for b in bundles]
    bundles[0].set_epoch(1)
    assert not torch.equal(next(iter(bundles[0].trainloader))[1], first[0])


# ---------------------------------------------------------------- one process and the flags

def test_a_world_of_one_is_a_single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ranks = Ranks.from_env()
    assert (ranks.rank, ranks.world_size, ranks.distributed, ranks.is_writer) == (0, 1, False, True)
    model = torch.nn.Linear(2, 2)
    values = torch.tensor([1.0, float("nan")])
    assert ranks.wrap(model) is model and ranks.mean(values) is values and ranks.max(3) == 3
    assert ranks.gather({"a": 1}) == [{"a": 1}] and ranks.broadcast("x") == "x"
    assert ranks.device_for("cuda:1") == "cuda:1"
    before = state_checksum(model, "cpu")
    with torch.no_grad():
        model.weight[0, 0] = torch.nextafter(model.weight[0, 0], torch.tensor(2.0))  # one bit
    assert state_checksum(model, "cpu") != before


@pytest.mark.parametrize("flags, message", [
    (["--inject-nan-rank", "1"], "--inject-nan-rank needs --inject-nan-at"),
    (["--inject-nan-at", "1", "--inject-nan-rank", "1"], "the run has 1 process(es), ranks 0 to 0"),
    (["--nproc", "2", "--inject-nan-at", "1", "--inject-nan-rank", "2"], "the run has 2 process(es), ranks 0 to 1"),
    (["--inject-nan-rank", "-1"], "expected a rank"),
    (["--nproc", "0"], "positive int"),
])
def test_the_new_flags_fail_in_one_line(capsys, tmp_path, flags, message):
    code, out, err = run_cli(capsys, "train", *flags, "--epochs", "2", "--out", tmp_path / "run")
    one_line_error(code, err, message)
    assert not (tmp_path / "run").exists()


def test_under_torchrun_nproc_must_match_and_only_rank_0_speaks(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code, _, err = run_cli(capsys, "train", "--nproc", "3", "--out", tmp_path)
    one_line_error(code, err, "--nproc 3 but torchrun started 2 processes")
    monkeypatch.setenv("RANK", "1")
    code, _, err = run_cli(capsys, "train", "--nproc", "3", "--out", tmp_path)
    assert code == cli.EXIT_USAGE and err == ""


def test_nproc_checks_the_folder_before_it_launches(capsys, lifecycle):
    code, out, err = run_cli(capsys, "train", "--nproc", "2", "--out", lifecycle[0])
    one_line_error(code, err, "already holds a finished run")


def test_the_launched_processes_get_the_arguments_but_nproc():
    command = launch.torchrun_command(2, ["train", "--nproc", "2", "--epochs", "3", "--npro=2", "--out", "x"])
    assert command[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m"]
    assert command[6:] == ["esper_fast", "train", "--epochs", "3", "--out", "x"]


def test_candidates_on_two_processes_are_the_winners_own_two_process_run(workdir, lifecycle):
    """--candidates under --nproc 2: every rank judges on its shard and the sums over the ranks
    decide, so every rank keeps the same winner, whose run is its own two-process run."""
    out = workdir / "candidates"
    result = child(esper_fast("train", "--nproc", 2, "--candidates", "norm,conv_light,depthwise", *LIFECYCLE,
                              "--out", out), workdir)
    assert result.returncode == 0, result.stderr
    judged = [r for r in epochs_of(out) if r.get("judgements")]
    assert len(judged) == 1
    judgement = judged[0]["judgements"]["block2_post"]
    winner = next(c["blueprint"] for c in judgement["candidates"] if c["seed_id"] == judgement["winner"])
    alone = lifecycle[0]
    if winner != "conv_light":
        alone = workdir / f"alone-{winner}"
        result = child(esper_fast("train", "--nproc", 2, "--blueprint", winner, *LIFECYCLE, "--out", alone), workdir)
        assert result.returncode == 0, result.stderr
    # The ranks' checksums cover the model, whose candidates the run alone does not hold.
    skip = CLOCK | {"events", "candidates", "judgements", "seed_id", "blueprint", "ranks"}

    def comparable(folder):
        return [{k: v for k, v in r.items() if k not in skip} for r in epochs_of(folder)]

    assert comparable(out) == comparable(alone)
    for record in epochs_of(out):  # the ranks agreed after every epoch, the judgement's included
        assert len({rank["checksum"] for rank in record["ranks"]}) == 1
