"""Attribution of every live slot: Shapley values, leave-one-out, alone-on and interactions.

The math is checked against brute force (the Shapley value as the average marginal
contribution over every order of the players, in float64), and validate_epoch's values
against a brute-force evaluation of every subset by ordinary forwards under forced alphas.
"""

import itertools
import random

import pytest
import torch
import torch.nn as nn

from esper_fast.kasmina import CNNHost, MorphogeneticModel, SeedStage, TransformerHost
from esper_fast.kasmina.host import forced_alphas
from esper_fast.ops import reference_mode
from esper_fast.runtime import TaskConfig
from esper_fast.tolaria import (
    SlotAttribution,
    slot_attribution,
    validate_and_get_metrics,
    validate_epoch,
    validate_with_attribution,
)
from esper_fast.tolaria.attribution import attribute, plan_attribution
from slot_helpers import grow


def cnn_model(n_blocks, live):
    torch.manual_seed(0)
    host = CNNHost(num_classes=10, n_blocks=n_blocks, base_channels=8)
    model = MorphogeneticModel(host, slots=list(host.injection_points), task_config=TaskConfig.for_cifar10())
    for slot_id, alpha in zip(model.seed_slots, live):
        grow(model, slot_id, "conv_light", SeedStage.BLENDING, alpha)
    return model


def lm_model(n_layer, alphas):
    torch.manual_seed(0)
    host = TransformerHost(vocab_size=40, n_embd=16, n_head=2, n_layer=n_layer, block_size=8, dropout=0.1)
    model = MorphogeneticModel(host, slots=list(host.injection_points), task_config=TaskConfig.for_tinystories())
    for slot_id, alpha in zip(model.seed_slots, alphas):
        grow(model, slot_id, "lora", SeedStage.BLENDING, alpha, lora_std=0.5)
    return model


def cnn_data(n=3, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


def lm_data(n=2, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 40, (batch, 8), generator=g), torch.randint(0, 40, (batch, 8), generator=g)) for _ in range(n)]


def brute_force_values(model, data, live, task_type="classification"):
    """f(T) for every subset T of ``live``: accuracy (percent) and mean batch loss from
    ordinary forwards under forced alphas, in float64."""
    values = {}
    model.eval()
    with torch.no_grad():
        for size in range(len(live) + 1):
            for subset in itertools.combinations(live, size):
                correct = total = 0
                loss = 0.0
                with forced_alphas(model.seed_slots, {s: 0.0 for s in live if s not in subset}):
                    for x, y in data:
                        out = model(x).double()
                        out, y = (out.reshape(-1, out.shape[-1]), y.reshape(-1)) if task_type == "lm" else (out, y)
                        correct += int((out.argmax(-1) == y).sum())
                        total += y.numel()
                        loss += float(nn.functional.cross_entropy(out, y))
                values[frozenset(subset)] = (100.0 * correct / total, loss / len(data))
    return values


def brute_force_shapley(players, f):
    """The average marginal contribution over every order of ``players``."""
    orders = list(itertools.permutations(players))
    return {
        p: sum(f(frozenset(o[: o.index(p) + 1])) - f(frozenset(o[: o.index(p)])) for o in orders) / len(orders)
        for p in players
    }


# ---------------------------------------------------------------- the math


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_exact_shapley_and_contributions_against_brute_force(n):
    rng = random.Random(n)
    players = tuple(f"s{i}" for i in range(n))
    values = {frozenset(c): rng.uniform(0, 100) for k in range(n + 1) for c in itertools.combinations(players, k)}
    plan = plan_attribution(players, players)
    assert plan.exact and plan.subsets[0] == frozenset(players) and len(plan.subsets) == 2**n
    result = attribute(plan, values, {s: -v for s, v in values.items()}).accuracy
    f = values.__getitem__
    expected = brute_force_shapley(players, f)
    full, empty = frozenset(players), frozenset()
    for p in players:
        assert result.shapley[p] == pytest.approx(expected[p], rel=1e-12, abs=1e-12)
        assert result.shapley_error[p] == 0.0
        assert result.leave_one_out[p] == f(full) - f(full - {p})
        assert result.alone_on[p] == f(frozenset({p})) - f(empty)
    assert sum(result.shapley.values()) == pytest.approx(f(full) - f(empty), abs=1e-9)  # efficiency
    for a, b in itertools.combinations(players, 2):
        assert result.interactions[(a, b)] == f(frozenset({a, b})) - f(frozenset({a})) - f(frozenset({b})) + f(empty)


def test_slots_that_cannot_change_the_output_get_zero_and_change_nothing_else():
    slots, players = ("a", "b", "c"), ("a", "c")
    plan = plan_attribution(slots, players)
    assert set(plan.subsets) == {frozenset(s) for k in range(3) for s in itertools.combinations(players, k)}
    values = {frozenset(): 1.0, frozenset("a"): 3.0, frozenset("c"): 2.0, frozenset("ac"): 7.0}
    result = attribute(plan, values, values)
    assert result.slots == slots and result.accuracy.shapley["b"] == 0.0
    assert result.accuracy.leave_one_out["b"] == result.accuracy.alone_on["b"] == 0.0
    assert result.accuracy.interactions[("a", "b")] == 0.0 and result.accuracy.interactions[("a", "c")] == 3.0
    assert result.accuracy.shapley["a"] == pytest.approx(0.5 * (2.0 + 5.0))


def _sampled(values, players, pairs, seed):
    plan = plan_attribution(players, players, exact_max_slots=4, permutations=2 * pairs,
                            generator=torch.Generator().manual_seed(seed))
    assert not plan.exact and len(plan.orders) == 2 * pairs
    assert all(plan.orders[i + 1] == plan.orders[i][::-1] for i in range(0, len(plan.orders), 2))  # antithetic
    return plan, attribute(plan, values, values).accuracy


def _game(players, seed, pairwise_only=False):
    """Values of every subset: random (a general game), or additive with pairwise terms."""
    rng = random.Random(seed)
    subsets = [frozenset(c) for k in range(len(players) + 1) for c in itertools.combinations(players, k)]
    if not pairwise_only:
        return {subset: rng.uniform(0, 100) for subset in subsets}
    weights = {p: rng.uniform(-3, 3) for p in players}
    pair_weights = {pair: rng.uniform(-2, 2) for pair in itertools.combinations(players, 2)}
    return {
        subset: sum(weights[p] for p in subset) + sum(w for (a, b), w in pair_weights.items() if {a, b} <= subset)
        for subset in subsets
    }


@pytest.mark.parametrize("n", [5, 6])
def test_sampled_shapley_is_deterministic_efficient_and_its_bound_covers_the_exact_value(n):
    players = tuple(f"s{i}" for i in range(n))
    values = _game(players, seed=7)
    exact = brute_force_shapley(players, values.__getitem__)
    plan, first = _sampled(values, players, pairs=12, seed=3)
    _, again = _sampled(values, players, pairs=12, seed=3)
    _, other = _sampled(values, players, pairs=12, seed=4)
    assert first == again and first.shapley != other.shapley
    assert set(plan.subsets) >= {frozenset(players), frozenset()} | {frozenset(p) for p in itertools.combinations(players, 2)}
    assert sum(first.shapley.values()) == pytest.approx(values[frozenset(players)] - values[frozenset()], abs=1e-9)
    assert all(first.shapley_error[p] > 0 for p in players)
    # Over many generator seeds the 95% bounds cover the exact values about 95% of the time.
    covered = checked = 0
    for seed in range(40):
        _, sampled = _sampled(values, players, pairs=12, seed=100 + seed)
        covered += sum(abs(sampled.shapley[p] - exact[p]) <= sampled.shapley_error[p] for p in players)
        checked += n
    assert 0.88 <= covered / checked


def test_antithetic_pairs_are_exact_for_a_game_with_pairwise_interactions_only():
    # A marginal contribution over an order and its reverse averages to the Shapley value
    # when subsets interact at most in pairs: every sample is exact, the bound is ~0.
    players = tuple(f"s{i}" for i in range(6))
    values = _game(players, seed=7, pairwise_only=True)
    exact = brute_force_shapley(players, values.__getitem__)
    _, sampled = _sampled(values, players, pairs=3, seed=0)
    for p in players:
        assert sampled.shapley[p] == pytest.approx(exact[p], abs=1e-9) and sampled.shapley_error[p] < 1e-9


def test_the_t_quantile():
    from esper_fast.tolaria.attribution import t_quantile_95

    table = {1: 12.706, 2: 4.303, 5: 2.571, 11: 2.201, 30: 2.042, 120: 1.980}  # printed tables
    for df, value in table.items():
        assert t_quantile_95(df) == pytest.approx(value, abs=1e-3)


def test_the_plan_rejects_too_few_permutations_and_strangers():
    with pytest.raises(ValueError, match="at least 4"):
        plan_attribution("abcde", "abcde", permutations=2)
    with pytest.raises(ValueError, match="must be live slots"):
        plan_attribution("ab", "abc")


# ---------------------------------------------------------------- validate_epoch and slot_attribution


def _assert_matches_brute_force(result: SlotAttribution, values, live, loss_rel=1e-5):
    accuracy = {s: v[0] for s, v in values.items()}
    loss = {s: v[1] for s, v in values.items()}
    assert result.slots == tuple(live) and result.exact
    for subset, (acc, lss) in values.items():
        assert result.accuracy.values[subset] == acc
        assert result.loss.values[subset] == pytest.approx(lss, rel=loss_rel)
    exact_acc = brute_force_shapley(live, accuracy.__getitem__)
    exact_loss = brute_force_shapley(live, loss.__getitem__)
    for s in live:
        assert result.accuracy.shapley[s] == pytest.approx(exact_acc[s], abs=1e-9)
        assert result.loss.shapley[s] == pytest.approx(exact_loss[s], rel=1e-4, abs=1e-6)
    full, empty = frozenset(live), frozenset()
    for metric in (result.accuracy, result.loss):  # efficiency: the values sum to f(all) - f(none)
        assert sum(metric.shapley.values()) == pytest.approx(metric.values[full] - metric.values[empty], abs=1e-9)


@pytest.mark.parametrize("n_blocks,alphas", [(3, (0.5, 0.5)), (4, (0.5, 0.7, 0.9)), (5, (0.6, 0.4, 0.8, 1.0))])
def test_validate_epoch_gives_every_live_slot_its_exact_shapley_value(n_blocks, alphas):
    model = cnn_model(n_blocks, alphas)
    train, test = cnn_data(seed=1), cnn_data(seed=2)
    live = list(model.seed_slots)
    result = validate_epoch(model, train, test, nn.CrossEntropyLoss(), "cpu", compute_per_class=True)
    values = brute_force_values(model, test, live)
    _assert_matches_brute_force(result.slot_attribution, values, live)
    metrics = validate_and_get_metrics(model, train, test, nn.CrossEntropyLoss(), "cpu", compute_per_class=True)
    assert (result.val_accuracy, result.train_accuracy, result.per_class_acc) == (metrics[1], metrics[3], metrics[4])
    assert result.val_loss == pytest.approx(metrics[0], rel=1e-6)
    # The main slot's counterfactual is its leave-one-out, as validate_with_attribution measures it.
    single = validate_with_attribution(model, test, nn.CrossEntropyLoss(), "cpu")
    assert (result.attribution.real_accuracy, result.attribution.baseline_accuracy) == (
        single.real_accuracy, single.baseline_accuracy)
    assert result.attribution.seed_contribution == pytest.approx(result.slot_attribution.accuracy.leave_one_out[model.slot_id])


def test_the_transformer_gets_every_live_slot_exactly_from_the_lm_loss_and_token_accuracy():
    model = lm_model(4, (0.5, 0.9, 0.7, 1.0))
    data = lm_data()
    live = list(model.seed_slots)
    result = slot_attribution(model, data, nn.CrossEntropyLoss(), "cpu", task_type="lm")
    _assert_matches_brute_force(result, brute_force_values(model, data, live, "lm"), live)


def test_above_the_exact_limit_every_sampled_order_is_measured_exactly_and_the_bound_covers_the_exact_value():
    model = lm_model(5, (0.5, 0.9, 0.7, 1.0, 0.6))
    data = lm_data(n=2, batch=6)
    criterion = nn.CrossEntropyLoss()
    exact = slot_attribution(model, data, criterion, "cpu", task_type="lm", exact_max_slots=5)
    sampled = slot_attribution(model, data, criterion, "cpu", task_type="lm", permutations=40,
                               generator=torch.Generator().manual_seed(11))
    again = slot_attribution(model, data, criterion, "cpu", task_type="lm", permutations=40,
                             generator=torch.Generator().manual_seed(11))
    assert exact.exact and not sampled.exact and sampled.permutations == 40 and sampled == again
    for subset, value in sampled.accuracy.values.items():
        assert value == exact.accuracy.values[subset]  # every measured subset is exact
    for metric in ("accuracy", "loss"):
        got, want = getattr(sampled, metric), getattr(exact, metric)
        assert got.leave_one_out == pytest.approx(want.leave_one_out) and got.alone_on == pytest.approx(want.alone_on)
        assert got.interactions == pytest.approx(want.interactions)
        for s in exact.slots:
            assert abs(got.shapley[s] - want.shapley[s]) <= got.shapley_error[s] + 1e-9, (metric, s)


def test_a_model_whose_only_live_seed_is_in_its_main_slot_measures_two_configurations_as_before(device_reads):
    torch.manual_seed(0)
    model = MorphogeneticModel(CNNHost(num_classes=10, base_channels=8), task_config=TaskConfig.for_cifar10())
    grow(model, "block2_post", "conv_light", SeedStage.BLENDING, 0.5)
    data = cnn_data()
    result = validate_epoch(model, data, data, nn.CrossEntropyLoss(), "cpu", compute_per_class=True)
    assert device_reads == [3]  # real, train and baseline in one read: the single-slot path
    attribution = result.slot_attribution
    assert attribution.slots == ("block2_post",) and attribution.exact
    assert attribution.accuracy.values == {
        frozenset({"block2_post"}): result.attribution.real_accuracy,
        frozenset(): result.attribution.baseline_accuracy,
    }
    assert attribution.accuracy.shapley["block2_post"] == result.attribution.seed_contribution
    assert attribution.loss.shapley["block2_post"] == result.attribution.real_loss - result.attribution.baseline_loss


def test_several_live_slots_read_the_device_once_per_call_and_never_per_batch(device_reads):
    model = cnn_model(4, (0.5, 0.7, 0.9))
    validate_epoch(model, cnn_data(n=4), cnn_data(n=4), nn.CrossEntropyLoss(), "cpu")
    assert device_reads == [9]  # the eight configurations and the train pass, read together


def test_without_a_seed_in_the_main_slot_only_the_slot_attribution_is_given():
    torch.manual_seed(0)
    host = CNNHost(num_classes=10, n_blocks=3, base_channels=8)
    model = MorphogeneticModel(host, slots=["block2_post", "block3_post"], task_config=TaskConfig.for_cifar10())
    grow(model, "block3_post", "conv_light", SeedStage.BLENDING, 0.5)
    data = cnn_data()
    result = validate_epoch(model, data, data, nn.CrossEntropyLoss(), "cpu")
    assert result.attribution is None and result.slot_attribution.slots == ("block3_post",)
    _assert_matches_brute_force(result.slot_attribution, brute_force_values(model, data, ["block3_post"]), ["block3_post"])
    assert validate_epoch(model, data, data, nn.CrossEntropyLoss(), "cpu", attribution=False).slot_attribution is None


def test_fossils_stay_on_and_seeds_that_change_nothing_get_zero():
    torch.manual_seed(0)
    host = CNNHost(num_classes=10, n_blocks=5, base_channels=8)
    model = MorphogeneticModel(host, slots=list(host.injection_points), task_config=TaskConfig.for_cifar10())
    grow(model, "block2_post", "conv_light", SeedStage.FOSSILIZED, 1.0)
    grow(model, "block3_post", "conv_light", SeedStage.TRAINING, 0.0)  # straight-through: no effect
    grow(model, "block4_post", "conv_light", SeedStage.BLENDING, 0.5)
    grow(model, "block5_post", "conv_light", SeedStage.GERMINATED, 0.0)
    data = cnn_data()
    result = validate_epoch(model, data, data, nn.CrossEntropyLoss(), "cpu").slot_attribution
    assert result.slots == ("block3_post", "block4_post", "block5_post")
    assert set(result.accuracy.values) == {frozenset(), frozenset({"block4_post"})}
    for idle in ("block3_post", "block5_post"):
        assert result.accuracy.shapley[idle] == result.loss.shapley[idle] == result.accuracy.leave_one_out[idle] == 0.0
    values = brute_force_values(model, data, ["block4_post"])  # the fossil as it is throughout
    assert result.accuracy.values[frozenset()] == values[frozenset()][0]


def test_reference_mode_and_a_custom_criterion_give_the_same_attribution():
    model = cnn_model(4, (0.5, 0.7, 0.9))
    data = cnn_data()
    fast = validate_epoch(model, data, data, nn.CrossEntropyLoss(), "cpu").slot_attribution
    with reference_mode():
        reference = validate_epoch(model, data, data, nn.CrossEntropyLoss(), "cpu").slot_attribution
    custom = validate_epoch(model, data, data, nn.CrossEntropyLoss(label_smoothing=0.0, reduction="sum"), "cpu")
    assert reference.accuracy == fast.accuracy
    assert reference.loss.values == pytest.approx(fast.loss.values, rel=1e-5)
    assert custom.slot_attribution.accuracy == fast.accuracy  # per-configuration passes, same counts
    sizes = sum(len(y) for _, y in data) / len(data)
    assert {k: v / sizes for k, v in custom.slot_attribution.loss.values.items()} == pytest.approx(fast.loss.values, rel=1e-5)


def test_mode_and_alphas_are_restored_and_errors_are_clear():
    model = cnn_model(3, (0.5, 0.25))
    model.train()
    slot_attribution(model, cnn_data(n=1), nn.CrossEntropyLoss(), "cpu")
    assert model.training and [s.alpha for s in model.seed_slots.values()] == [0.5, 0.25]
    with pytest.raises(ValueError, match="testloader is empty"):
        slot_attribution(model, [], nn.CrossEntropyLoss(), "cpu")
    with pytest.raises(TypeError, match="seed_slots"):
        slot_attribution(nn.Linear(2, 2), [], nn.CrossEntropyLoss(), "cpu")
    assert model.training
