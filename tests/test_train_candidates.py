"""esper-fast train --candidates: several blueprints incubate together in a slot and the one
with the best value at alpha 1 goes on. Facts checked on CPU: the run is, record for record
and tensor for tensor, the run of the winning blueprint alone (whatever the candidates'
order); the log holds every candidate's judgement and gate verdict; the losers are culled as
``lost_judgement`` with their value; a run stopped during the incubation resumes to the same
records; every bad --candidates is refused in one line."""

import pytest
import torch

from esper_fast import train
from esper_fast.train.console import COLUMNS, epoch_lines
from esper_fast.train.report import EpochRecord
from cli_helpers import CLOCK, in_process, one_line_error, outcome, read_log, run_cli

TINY = ["--max-batches", "3", "--batch-size", "32", "--no-progress", "--seed", "3"]
# Seven epochs: germinate after 1, TRAINING in 2 (judged at its end), then the winner's lifecycle.
RUN = ["--epochs", "7", *TINY]
CANDIDATES = ["conv_light", "depthwise", "attention", "norm"]
# What only a run of candidates records: the events naming them, the candidates and judgement
# fields, and the seed the epoch's record names while they incubate (the lead).
CANDIDATE_FIELDS = {"events", "candidates", "judgements", "seed_id", "blueprint"}



@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("candidates")


@pytest.fixture(scope="module")
def runs(workdir):
    """The candidates in two orders, and the winner alone."""
    found = {}
    for name, order in (("forward", CANDIDATES), ("reversed", CANDIDATES[::-1])):
        out = workdir / name
        assert in_process(workdir, ["train", "--candidates", ",".join(order), *RUN, "--out", out]) == 0
        found[name] = out
    winner = _judgement(found["forward"])["winner_blueprint"]
    out = workdir / "alone"
    assert in_process(workdir, ["train", "--blueprint", winner, *RUN, "--out", out]) == 0
    found["alone"] = out
    return found


def _epochs(out):
    return [r for r in read_log(out / train.METRICS_FILE) if r["type"] == "epoch"]


def _judgement(out):
    judged = [r for r in _epochs(out) if r.get("judgements")]
    assert len(judged) == 1
    judgement = judged[0]["judgements"]["block2_post"]
    winner = next(c for c in judgement["candidates"] if c["seed_id"] == judgement["winner"])
    return {**judgement, "epoch": judged[0]["epoch"], "winner_blueprint": winner["blueprint"]}


def _comparable(out):
    return [{k: v for k, v in r.items() if k not in CLOCK | CANDIDATE_FIELDS} for r in _epochs(out)]


def _last_payload(out):
    return torch.load(train.RunDir(out).checkpoints()[-1], weights_only=True)


def test_the_run_is_the_winners_own_run_bit_for_bit_whatever_the_order(runs):
    alone = _comparable(runs["alone"])
    for name in ("forward", "reversed"):
        assert _comparable(runs[name]) == alone, name
        # The model and the seed's optimizer at the end: the same tensors under the same names.
        got, want = _last_payload(runs[name]), _last_payload(runs["alone"])
        assert list(got["model"]["tensors"]) == list(want["model"]["tensors"])
        for key, tensor in want["model"]["tensors"].items():
            assert torch.equal(got["model"]["tensors"][key], tensor), (name, key)
        assert "rivals" not in got["optimizers"]
        seed, wanted = got["optimizers"]["seed"], want["optimizers"]["seed"]
        assert (seed is None) == (wanted is None)
        for a, b in zip(*(o["state"].values() for o in (seed, wanted) if o is not None)):
            assert all(torch.equal(a[k], b[k]) for k in b)
    # The same winner in either order: each value depends on its candidate alone.
    assert _judgement(runs["forward"])["winner_blueprint"] == _judgement(runs["reversed"])["winner_blueprint"]
    values = {c["blueprint"]: c["value"] for c in _judgement(runs["forward"])["candidates"]}
    assert values == {c["blueprint"]: c["value"] for c in _judgement(runs["reversed"])["candidates"]}


def test_the_judgement_is_logged_with_every_value_and_gate_and_the_losers_are_culled(runs):
    judgement = _judgement(runs["forward"])
    assert judgement["epoch"] == 2 and [c["blueprint"] for c in judgement["candidates"]] == CANDIDATES
    best = max(c["value"] for c in judgement["candidates"])
    winner = next(c for c in judgement["candidates"] if c["seed_id"] == judgement["winner"])
    assert winner["value"] == best
    for candidate in judgement["candidates"]:
        # The value is the accuracy at alpha 1 over the accuracy with none.
        assert candidate["value"] == pytest.approx(candidate["accuracy"] - judgement["baseline_accuracy"])
    assert set(judgement["gates"]) == {c["seed_id"] for c in judgement["candidates"]}
    assert all(g["passed"] for g in judgement["gates"].values())
    epochs = _epochs(runs["forward"])
    assert [c["blueprint"] for c in epochs[1]["candidates"]["block2_post"]] == CANDIDATES
    assert all("candidates" not in r for r in epochs[2:])
    summary = [r for r in read_log(runs["forward"] / train.METRICS_FILE) if r["type"] == "summary"][0]
    seeds = {s["seed_id"]: s for s in summary["seeds"]}
    assert [s["blueprint"] for s in summary["seeds"]] == CANDIDATES
    for candidate in judgement["candidates"]:
        record = seeds[candidate["seed_id"]]
        assert record["judged_value"] == candidate["value"]
        if candidate["seed_id"] != judgement["winner"]:
            assert (record["outcome"], record["reason"], record["decided_epoch"]) == ("culled", "lost_judgement", 2)
        else:
            assert record["outcome"] in ("fossilized", "culled") and record["reason"] != "lost_judgement"
    events = epochs[1]["events"]
    assert f"{judgement['winner']} ({winner['blueprint']}) wins the judgement" in events[0]
    assert sum("culled: lost_judgement" in e for e in events) == 3


def test_the_console_puts_the_candidates_events_on_lines_of_their_own(runs):
    record = EpochRecord.from_log(_epochs(runs["forward"])[1])
    lines = epoch_lines(record, 7, "classification")
    # The epoch line is the one-slot line it always was; the events under it fit the width.
    assert len(lines) > 2 and all(len(line) <= COLUMNS for line in lines[1:]), lines
    assert any("wins the judgement" in line for line in lines[1:])


def test_a_run_stopped_during_the_incubation_resumes_to_the_same_records(workdir, runs):
    out = workdir / "stopped"
    argv = ["train", "--candidates", ",".join(CANDIDATES), *RUN, "--out", out]
    assert in_process(workdir, argv, signal_at="SIGTERM@2:1") == 143
    saved = _last_payload(out)
    assert saved["position"] == {"epochs_done": 1, "steps_done": 1}
    assert set(saved["optimizers"]["rivals"]["block2_post"]) == {"seed-2", "seed-3", "seed-4"}
    assert any(".rivals.2." in key for key in saved["model"]["tensors"])
    assert in_process(workdir, ["train", "--resume", out]) == 0
    assert outcome(out) == outcome(runs["forward"])


@pytest.mark.parametrize("flags, message", [
    (["--candidates", "conv_light,depthwise", "--blueprint", "norm"], "give --blueprint or --candidates, not both"),
    (["--candidates", "conv_light,nope"], "unknown blueprint 'nope'"),
    (["--candidates", "conv_light,conv_light"], "names conv_light twice in one slot"),
    (["--candidates", "conv_light,,norm"], "expected blueprint names separated by commas"),
    (["--candidates", "conv_light,norm/depthwise,attention"], "gives 2 sets for 1 slot(s)"),
    (["--slots", "block2_post,block3_post", "--candidates", "a/b/c"], "unknown blueprint 'a'"),
])
def test_bad_candidates_fail_in_one_line(capsys, tmp_path, flags, message):
    code, _, err = run_cli(capsys, "train", *flags, "--out", tmp_path / "run", "--epochs", "1")
    one_line_error(code, err, message)


def test_candidates_per_slot_are_recorded_in_the_hosts_order():
    from esper_fast.train.settings import RunConfig, slot_blueprints, slot_candidates, with_slots

    config = with_slots(RunConfig(slots=["block3_post", "block2_post"], candidates="norm,attention/conv_light,depthwise"),
                        "cnn")
    assert config.candidates == "conv_light,depthwise/norm,attention"
    assert config.blueprint == "conv_light,norm"
    assert slot_candidates(config) == {"block2_post": ("conv_light", "depthwise"), "block3_post": ("norm", "attention")}
    assert slot_blueprints(config) == {"block2_post": "conv_light", "block3_post": "norm"}
    every = with_slots(RunConfig(slots=["block2_post", "block3_post"], candidates="conv_light,norm"), "cnn")
    assert slot_candidates(every) == {"block2_post": ("conv_light", "norm"), "block3_post": ("conv_light", "norm")}
    assert "candidates" not in with_slots(RunConfig(), "cnn").to_record()


def test_help_names_candidates(capsys):
    code, out, _ = run_cli(capsys, "train", "--help")
    assert code == 0 and "--candidates NAME,NAME[,...][/...]" in out and "separated by /" in out
