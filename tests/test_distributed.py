"""Validation across ranks: two gloo processes over a split test set give the counts of one
process over the whole set, with one all-reduce per call.

One spawn runs every scenario (process start-up dominates on 2 cores); each rank writes what
it measured to a file and the test compares.
"""

import dataclasses
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from esper_fast.kasmina import CNNHost, MorphogeneticModel, SeedStage
from esper_fast.runtime import TaskConfig

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
BATCHES, BATCH = 4, 6  # the whole test set: 4 batches of 6; each rank takes every other batch


def _model():
    torch.manual_seed(0)
    model = MorphogeneticModel(CNNHost(num_classes=10, base_channels=4), task_config=TaskConfig.for_cifar10())
    model.germinate_seed("conv_light", "seed")
    model.seed_slot.state.transition(SeedStage.TRAINING)
    model.seed_slot.state.transition(SeedStage.BLENDING)
    model.seed_slot.set_alpha(0.5)
    return model


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, 3, 16, 16, generator=g), torch.randint(0, 10, (BATCH,), generator=g)) for _ in range(BATCHES)]


def _measure(train, test):
    from esper_fast.tolaria import validate_and_get_metrics, validate_epoch, validate_with_attribution

    model, criterion = _model(), nn.CrossEntropyLoss()
    metrics = validate_and_get_metrics(model, train, test, criterion, "cpu", compute_per_class=True)
    attribution = validate_with_attribution(model, test, criterion, "cpu")
    epoch = validate_epoch(model, train, test, criterion, "cpu", compute_per_class=True)
    per_class = [metrics[4][c] for c in range(10)]
    return {
        "metrics": list(metrics[:4]) + [per_class],
        "attribution": [attribution.real_accuracy, attribution.baseline_accuracy, attribution.real_loss],
        "epoch": [epoch.val_accuracy, epoch.train_accuracy, [epoch.per_class_acc[c] for c in range(10)],
                  epoch.attribution.baseline_accuracy],
    }


def _reduce_in_place(rank):
    """MetricsAccumulator.all_reduce: the same reduction, written back into the state."""
    from esper_fast.ops import MetricsAccumulator, StackedMetricsAccumulator

    g = torch.Generator().manual_seed(rank)
    acc = MetricsAccumulator(10, "cpu", per_class=True)
    acc.update(torch.randn(6, 10, generator=g), torch.full((6,), 11 + rank) if rank else torch.arange(6))
    acc.all_reduce()
    stacked = StackedMetricsAccumulator(2, 10, "cpu")
    stacked.update(torch.randn(12, 10, generator=g), torch.arange(6))
    stacked.all_reduce()
    try:
        acc.compute()
        bad = "no error"
    except ValueError as exc:
        bad = str(exc)
    counts = [dataclasses.astuple(r) for r in stacked.compute()]
    import esper_fast._C as C

    state = {"batches": int(acc.state[C.metrics_slot_batches]), "total": int(acc.state[C.metrics_slot_total])}
    return {"bad": bad, "state": state, "stacked": counts}


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        reduces = []
        original = dist.all_reduce

        def counting(*args, **kwargs):
            reduces.append(1)
            return original(*args, **kwargs)

        dist.all_reduce = counting
        result = {}
        train, test = _data(1), _data(2)
        result["split"] = _measure(train[rank::WORLD], test[rank::WORLD])
        result["reduces_per_call"] = len(reduces) / 3
        # A rank whose shard is empty adds nothing (and does not hang the others).
        result["uneven"] = _measure(train, test if rank == 0 else [])
        # A bad target on one rank fails the call on every rank.
        bad = [(x, y.clone().fill_(10)) for x, y in test[:1]] if rank == 1 else test[:1]
        try:
            _measure(train, bad)
            result["bad"] = "no error"
        except ValueError as exc:
            result["bad"] = str(exc)
        # All shards empty: the same error as one process with an empty loader.
        try:
            _measure(train, [])
            result["empty"] = "no error"
        except ValueError as exc:
            result["empty"] = str(exc)
        dist.all_reduce = original
        result["in_place"] = _reduce_in_place(rank)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_two_ranks_over_a_split_test_set_count_like_one_process(ranks):
    whole = _measure(_data(1), _data(2))
    for rank in ranks:
        split = rank["split"]
        assert split["metrics"][1] == whole["metrics"][1]  # val accuracy: the exact count
        assert split["metrics"][3] == whole["metrics"][3]  # train accuracy
        assert split["metrics"][4] == whole["metrics"][4]  # per-class accuracy
        assert split["metrics"][0] == pytest.approx(whole["metrics"][0], rel=1e-9)
        assert split["attribution"][:2] == whole["attribution"][:2]
        assert split["attribution"][2] == pytest.approx(whole["attribution"][2], rel=1e-9)
        assert split["epoch"] == whole["epoch"]
    assert ranks[0]["split"] == ranks[1]["split"]  # every rank returns the same numbers


def test_one_all_reduce_per_validation_call(ranks):
    assert ranks[0]["reduces_per_call"] == 1 and ranks[1]["reduces_per_call"] == 1


def test_an_empty_shard_adds_nothing(ranks):
    alone = _measure(_data(1), _data(2))
    for rank in ranks:
        assert rank["uneven"]["metrics"][1] == alone["metrics"][1]
        assert rank["uneven"]["attribution"][:2] == alone["attribution"][:2]


def test_a_bad_target_on_one_rank_fails_every_rank(ranks):
    for rank in ranks:
        assert "target(s) outside [0, 10)" in rank["bad"] and "e.g. 10" in rank["bad"]


def test_the_accumulators_all_reduce_is_the_same_reduction_in_place(ranks):
    first, second = ranks[0]["in_place"], ranks[1]["in_place"]
    assert first == second  # every rank holds the sums, and the first flagged rank's value
    assert first["bad"].endswith("e.g. 12") and "6 target(s)" in first["bad"]
    assert first["state"] == {"batches": 2, "total": 12}  # the batches and rows of both ranks
    assert all(batches == 2 and total == 12 for _, batches, _, total, *_ in first["stacked"])


def test_empty_loaders_on_every_rank_raise_on_every_rank(ranks):
    for rank in ranks:
        assert "testloader is empty" in rank["empty"]


def test_a_group_of_one_behaves_as_none(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        from esper_fast.tolaria.distributed import process_group

        assert process_group() is None
        assert _measure(_data(1), _data(2)) == _measure(_data(1), _data(2))
    finally:
        dist.destroy_process_group()
