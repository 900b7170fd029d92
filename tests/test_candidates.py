"""Several candidate seeds in one slot (issue 25): each starts as a germination of it alone
would, learns in TRAINING exactly as it would alone while the host learns as it would without
them, the judgement's shared pass measures what one forward per configuration measures, and
keep_candidate / cull / checkpoints / the governor leave the slot as a lone run of the winner
(or an empty slot) would be."""

import contextlib
import copy
import functools
import io
import math

import pytest
import torch
import torch.nn as nn

from esper_fast.kasmina import SeedSlot, SeedStage
from esper_fast.leyline import TelemetryEventType
from esper_fast.ops import reference_mode
from esper_fast.runtime.tasks import get_task_spec
from esper_fast.tolaria import TolariaGovernor
from esper_fast.tolaria.batches import compute_loss
from esper_fast.tolaria.judgement import (
    CandidateValue,
    _shares_the_prefix,
    judge_candidates,
    judge_candidates_each,
    winner_of,
)

CNN_BLUEPRINTS = ["conv_light", "depthwise", "attention", "norm"]
LM_BLUEPRINTS = ["lora", "mlp", "attention", "norm"]
BLUEPRINTS = {"cifar10": CNN_BLUEPRINTS, "tinystories": LM_BLUEPRINTS}
TASK_TYPE = {"cifar10": "classification", "tinystories": "lm"}
GERMINATION_SEED = 7  # torch's seed right before the germination, in every run compared
LM_SEQ = 8


def make_model(task="cifar10", slots=None):
    torch.manual_seed(0)
    return get_task_spec(task).create_model("cpu", slots=slots)


def batches(task, count, size, seed=1):
    g = torch.Generator().manual_seed(seed)
    if task == "cifar10":
        return [(torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 10, (size,), generator=g))
                for _ in range(count)]
    return [(torch.randint(0, 50257, (size, LM_SEQ), generator=g), torch.randint(0, 50257, (size, LM_SEQ), generator=g))
            for _ in range(count)]


def germinate(model, blueprints, *, lone=False):
    """Germinate from GERMINATION_SEED: one blueprint by ``germinate_seed`` (``lone``) or the
    list by ``germinate_candidates``."""
    torch.manual_seed(GERMINATION_SEED)
    if lone:
        (blueprint,) = blueprints
        model.germinate_seed(blueprint, f"{model.slot_id}-{blueprint}")
    else:
        model.germinate_candidates(blueprints)
    return model.seed_slot


def tensors(module):
    """The module's state_dict tensors (the slots' lifecycle states left out)."""
    return {key: value.detach().clone() for key, value in module.state_dict().items() if isinstance(value, torch.Tensor)}


def host_tensors(model):
    """The host's own parameters and buffers (every key outside the slots)."""
    return {k: v for k, v in tensors(model).items() if ".slots." not in k and not k.startswith("seed_slot")}


def assert_same_tensors(a, b):
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def train_steps(model, optimizers, data, task_type):
    """The training loop's steps (every optimizer zeroed and stepped); the outputs of each forward."""
    model.train()
    criterion, outputs = nn.CrossEntropyLoss(), []
    for inputs, labels in data:
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        out = model(inputs)
        outputs.append(out.detach().clone())
        compute_loss(out, labels, criterion, task_type).backward()
        for optimizer in optimizers:
            optimizer.step()
    return outputs


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def ready_to_blend(state):
    """Metrics that pass G2 (accuracy up 4 points over 5 epochs, an active seed gradient)."""
    for accuracy in (50.0, 51.0, 52.0, 53.0, 54.0):
        state.metrics.record_accuracy(accuracy)
    state.metrics.seed_gradient_norm_ratio = 0.5


# ============================================================================ germination


@functools.cache
def _main_slot(task):
    model = make_model(task)
    return model.slot_id, model.host.injection_points[model.slot_id]


def bare_slot(task, probe_cached=False):
    """The task model's main slot without its host (a germination draws from torch's
    generators as it does in the model). ``probe_cached``: an earlier seed drew its shape probe."""
    slot_id, channels = _main_slot(task)
    slot = SeedSlot(slot_id, channels, task_config=get_task_spec(task).task_config)
    if probe_cached:
        torch.manual_seed(1)
        slot.germinate("norm", "earlier")
        slot.cull()
        assert slot._shape_probe_cache
    return slot


def germinate_in(slot, blueprints, *, lone=False):
    torch.manual_seed(GERMINATION_SEED)
    if lone:
        (blueprint,) = blueprints
        slot.germinate(blueprint, f"{slot.slot_id}-{blueprint}")
    else:
        slot.germinate_candidates(blueprints)
    return slot


def probe_of(slot):
    return slot._shape_probe_cache[slot._topology()][1]


@pytest.mark.parametrize("task", ["cifar10", "tinystories"])
@pytest.mark.parametrize("order", ["given", "reversed", "rotated"])
@pytest.mark.parametrize("probe_cached", [False, True], ids=["fresh slot", "cached probe"])
def test_each_candidate_starts_as_its_lone_germination(task, order, probe_cached):
    blueprints = list(BLUEPRINTS[task])
    blueprints = {"given": blueprints, "reversed": blueprints[::-1], "rotated": blueprints[1:] + blueprints[:1]}[order]
    lone = {}
    for blueprint in blueprints:
        slot = germinate_in(bare_slot(task, probe_cached), [blueprint], lone=True)
        lone[blueprint] = (tensors(slot.seed), torch.get_rng_state(), probe_of(slot))

    slot = germinate_in(bare_slot(task, probe_cached), blueprints)
    assert [c.blueprint_id for c in slot.candidates] == blueprints
    for candidate in slot.candidates:
        assert_same_tensors(tensors(candidate.seed), lone[candidate.blueprint_id][0])
    # The generators are where the lead's germination alone leaves them, the probe is the one it drew.
    assert torch.equal(torch.get_rng_state(), lone[blueprints[0]][1])
    assert torch.equal(probe_of(slot), lone[blueprints[0]][2])


@pytest.mark.parametrize("task", ["cifar10", "tinystories"])
def test_a_germination_draws_the_shape_probe_only_in_a_fresh_slot(task):
    # So the cached-probe case above starts from another random state than the fresh one.
    germinate_in(bare_slot(task), ["norm"], lone=True)
    fresh = torch.get_rng_state()
    slot = bare_slot(task, probe_cached=True)
    probe = probe_of(slot)
    germinate_in(slot, ["norm"], lone=True)
    assert not torch.equal(torch.get_rng_state(), fresh)
    assert probe_of(slot) is probe


def test_one_candidate_is_exactly_germinate():
    lone = germinate(make_model(), ["depthwise"], lone=True)
    lone_rng = torch.get_rng_state()
    one = germinate(make_model(), ["depthwise"])
    assert torch.equal(torch.get_rng_state(), lone_rng)
    assert_same_tensors(tensors(one), tensors(lone))
    assert list(one.state_dict()) == list(lone.state_dict())
    assert "rivals" not in dict(one.named_children()) and one.rival_states == [] and not one.has_rivals
    assert set(one.get_extra_state()) == {"seed_state", "alpha_schedule"}
    assert [c.seed_id for c in one.candidates] == ["block2_post-depthwise"]


def test_germinate_candidates_refuses_repeats_and_a_live_seed():
    slot = make_model().seed_slot
    with pytest.raises(ValueError, match="named twice"):
        slot.germinate_candidates(["norm", "norm"])
    with pytest.raises(ValueError, match="given twice"):
        slot.germinate_candidates(["norm", "attention"], ["a", "a"])
    with pytest.raises(ValueError, match="at least one"):
        slot.germinate_candidates([])
    slot.germinate_candidates(["norm", "attention"])
    with pytest.raises(RuntimeError, match="already has active seed"):
        slot.germinate_candidates(["depthwise", "conv_light"])


def test_a_candidate_that_cannot_be_built_leaves_the_slot_and_generators_as_they_were():
    slot = make_model().seed_slot
    torch.manual_seed(GERMINATION_SEED)
    before = torch.get_rng_state()
    with pytest.raises(AssertionError, match="not available"):
        slot.germinate_candidates(["norm", "no_such_blueprint"])
    assert slot.seed is None and slot.state is None and not slot.has_rivals
    assert torch.equal(torch.get_rng_state(), before) and not slot._shape_probe_cache


# ============================================================================ training


def _incubation_run(task, blueprints, data, *, lone=False, stream=None):
    """A few SGD steps with ``blueprints`` in TRAINING (none: the host alone), one optimizer
    for the host and one per candidate; returns the model, each step's output and torch's
    random state after the germination. ``stream``: the random state to train from instead."""
    model = make_model(task)
    torch.manual_seed(GERMINATION_SEED)
    if blueprints:
        slot = germinate(model, blueprints, lone=lone)
        assert slot.advance_stage(SeedStage.TRAINING).passed
        assert [c.state.stage for c in slot.candidates] == [SeedStage.TRAINING] * len(blueprints)
    germinated = torch.get_rng_state()
    if stream is not None:
        torch.set_rng_state(stream)
    optimizers = [sgd(model.get_host_parameters())] + [sgd(c.seed.parameters()) for c in model.seed_slot.candidates]
    outputs = train_steps(model, optimizers, data, TASK_TYPE[task])
    return model, outputs, germinated


def _assert_incubation_is_exact(task, data, *, same_stream):
    """Candidates trained together against each alone and the host alone. ``same_stream``:
    the runs other than the lead's train from the random state the lead's germination left
    (the state training starts from with the candidates)."""
    blueprints = BLUEPRINTS[task]
    together, outputs, lead_stream = _incubation_run(task, blueprints, data)
    stream = lead_stream if same_stream else None
    host_only, host_outputs, _ = _incubation_run(task, [], data, stream=stream)
    for together_out, host_out in zip(outputs, host_outputs):
        assert torch.equal(together_out, host_out)  # the forward's value is the host's
    assert_same_tensors(host_tensors(together), host_tensors(host_only))
    for index, candidate in enumerate(together.seed_slot.candidates):
        initial = tensors(germinate_in(bare_slot(task), [candidate.blueprint_id], lone=True).seed)
        alone, _, germinated = _incubation_run(task, [candidate.blueprint_id], data, lone=True,
                                               stream=stream if index else None)
        assert index or torch.equal(germinated, lead_stream)  # the lead's own run needs no help
        assert_same_tensors(tensors(candidate.seed), tensors(alone.seed_slot.seed))
        assert_same_tensors(host_tensors(together), host_tensors(alone))
        # Every candidate learned: its weights moved from its germination.
        assert any(not torch.equal(v, initial[k]) for k, v in tensors(candidate.seed).items())


def test_cnn_candidates_learn_as_each_would_alone_and_the_host_as_without_them():
    # Nothing in the CNN's training draws a random number: every run as it comes.
    _assert_incubation_is_exact("cifar10", batches("cifar10", 3, 8), same_stream=False)


def test_transformer_candidates_learn_as_each_would_alone_on_the_same_random_stream():
    # The host's dropout draws from torch's generator, which each lone germination leaves at a
    # place of its own (the candidates train from where the lead's left it): on that same
    # stream every run is bit-identical, and the lead's lone run is on it anyway.
    _assert_incubation_is_exact("tinystories", batches("tinystories", 2, 1), same_stream=True)


def test_rivals_are_skipped_only_where_they_cannot_learn_or_change():
    # In eval without grad a rival's forward changes nothing; in train mode without grad it
    # runs, as a lone seed does (its buffers may move).
    model = make_model()
    slot = germinate(model, CNN_BLUEPRINTS)
    slot.advance_stage(SeedStage.TRAINING)
    calls = []
    for rival in slot.rivals:
        rival.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        model(x)
    assert calls == []
    model(x)
    model.train()
    with torch.no_grad():
        model(x)
    model(x)
    assert len(calls) == 3 * len(slot.rivals)


# ============================================================================ keep_candidate, cull


def _incubating(events=None, data_steps=2):
    model = make_model()
    slot = germinate(model, CNN_BLUEPRINTS)
    if events is not None:
        slot.on_telemetry = events.append
    slot.advance_stage(SeedStage.TRAINING)
    optimizers = [sgd(model.get_host_parameters())] + [sgd(c.seed.parameters()) for c in slot.candidates]
    train_steps(model, optimizers, batches("cifar10", data_steps, 8), "classification")  # draws no random number
    return model, slot


def test_keep_candidate_makes_the_winner_the_seed_and_culls_the_others_with_telemetry():
    events = []
    model, slot = _incubating(events)
    del events[:]
    winner = slot.candidates[2]
    winner_weights = tensors(winner.seed)
    details = {c.seed_id: {"value": float(i)} for i, c in enumerate(slot.candidates)}
    culled = slot.keep_candidate(winner.seed_id, details=details)

    assert slot.seed is winner.seed and slot.state is winner.state and slot.state.stage == SeedStage.TRAINING
    assert_same_tensors(tensors(slot.seed), winner_weights)
    losers = ["block2_post-conv_light", "block2_post-depthwise", "block2_post-norm"]
    assert [s.seed_id for s in culled] == losers and all(s.stage == SeedStage.CULLED for s in culled)
    assert not slot.has_rivals and slot.rivals is None and [c.seed_id for c in slot.candidates] == [winner.seed_id]
    kinds = [(e.event_type, e.seed_id) for e in events]
    assert kinds == [k for loser in losers for k in ((TelemetryEventType.SEED_STAGE_CHANGED, loser),
                                                     (TelemetryEventType.SEED_CULLED, loser))]
    culls = [e.data for e in events if e.event_type == TelemetryEventType.SEED_CULLED]
    assert [d["reason"] for d in culls] == ["lost_judgement"] * 3
    assert [d["judgement"] for d in culls] == [details[loser] for loser in losers]
    assert [e.data for e in events if e.event_type == TelemetryEventType.SEED_STAGE_CHANGED] == [
        {"from": "TRAINING", "to": "CULLED"}] * 3


def test_after_keep_candidate_the_state_dict_is_a_lone_runs():
    model, slot = _incubating()
    slot.keep_candidate("block2_post-attention")
    assert list(model.state_dict()) == list(make_lone_model("attention").state_dict())
    assert set(slot.get_extra_state()) == {"seed_state", "alpha_schedule"}
    assert "rivals" not in dict(slot.named_children())


@pytest.mark.parametrize("winner", ["conv_light", "depthwise"], ids=["the lead", "a rival"])
def test_after_keep_candidate_training_goes_on_as_the_winners_lone_run(winner):
    data, more = batches("cifar10", 2, 8), batches("cifar10", 2, 8, seed=2)
    winners_stream = _rng_after_lone_germination(winner)
    together, _, _ = _incubation_run("cifar10", CNN_BLUEPRINTS, data)
    alone, _, _ = _incubation_run("cifar10", [winner], data, lone=True)
    together.seed_slot.keep_candidate(f"block2_post-{winner}")
    assert torch.equal(torch.get_rng_state(), winners_stream)
    for model in (together, alone):
        train_steps(model, [sgd(model.get_host_parameters()), sgd(model.get_seed_parameters())], more, "classification")
    assert_same_tensors(tensors(together), tensors(alone))


def _rng_after_lone_germination(blueprint):
    germinate_in(bare_slot("cifar10"), [blueprint], lone=True)
    return torch.get_rng_state()


def make_lone_model(blueprint):
    model = make_model()
    germinate(model, [blueprint], lone=True)
    return model


def test_keep_candidate_watches_the_winner_as_a_lone_germination_would():
    model, slot = _incubating()
    slot.keep_candidate("block2_post-depthwise")
    lone = make_lone_model("depthwise")
    names, lone_names = ({id(p): n for n, p in m.named_parameters()} for m in (model, lone))
    monitor, lone_monitor = slot.isolation_monitor, lone.seed_slot.isolation_monitor
    assert [names[id(p)] for p in monitor._host_params] == [lone_names[id(p)] for p in lone_monitor._host_params]
    assert [names[id(p)] for p in monitor._seed_params] == [lone_names[id(p)] for p in lone_monitor._seed_params]


@pytest.mark.parametrize("winner", CNN_BLUEPRINTS)
def test_keep_candidate_moves_the_generators_to_the_winners_germination(winner):
    germinate(make_model(), [winner], lone=True)
    lone_rng = torch.get_rng_state()
    _, slot = _incubating()
    slot.keep_candidate(f"block2_post-{winner}")
    assert torch.equal(torch.get_rng_state(), lone_rng)


def test_keep_candidate_leaves_generators_that_moved_alone():
    _, slot = _incubating()
    torch.rand(1)  # something drew after the germination: the stream is no lone run's any more
    drawn = torch.get_rng_state()
    slot.keep_candidate("block2_post-norm")
    assert torch.equal(torch.get_rng_state(), drawn)


def test_keep_candidate_refuses_an_unknown_candidate():
    _, slot = _incubating()
    with pytest.raises(ValueError, match="no candidate 'nope'"):
        slot.keep_candidate("nope")
    assert len(slot.candidates) == 4


def test_candidates_do_not_leave_training_until_one_is_kept():
    model, slot = _incubating()
    ready_to_blend(slot.state)
    refused = slot.advance_stage(SeedStage.BLENDING)
    assert not refused.passed and refused.checks_failed == ["candidates_not_judged"]
    assert not slot.advance_stage().passed
    slot.step_epoch()
    assert slot.state.stage == SeedStage.TRAINING and slot.isolate_gradients

    slot.keep_candidate(slot.state.seed_id)
    gate = slot.advance_stage(SeedStage.BLENDING)
    assert gate.passed and slot.state.stage == SeedStage.BLENDING and not slot.isolate_gradients
    # ... as a lone seed with the same metrics does.
    lone = make_lone_model("conv_light").seed_slot
    lone.advance_stage(SeedStage.TRAINING)
    ready_to_blend(lone.state)
    lone_gate = lone.advance_stage(SeedStage.BLENDING)
    assert (gate.passed, gate.checks_passed, gate.score) == (lone_gate.passed, lone_gate.checks_passed, lone_gate.score)


def test_cull_ends_every_candidate():
    events = []
    model, slot = _incubating(events)
    ids = [c.seed_id for c in slot.candidates]
    del events[:]
    assert slot.cull("bad_run")
    assert slot.seed is None and slot.state is None and slot.candidates == [] and not slot.has_rivals
    assert not any(".seed." in k or ".rivals." in k for k in model.state_dict())
    culls = [e for e in events if e.event_type == TelemetryEventType.SEED_CULLED]
    assert [e.seed_id for e in culls] == ids and all(e.data["reason"] == "bad_run" for e in culls)
    # The slot takes a new seed as an empty one does.
    model.germinate_seed("norm", "next")
    assert slot.state.stage == SeedStage.GERMINATED


def test_leading_swaps_a_candidate_in_for_the_block_only():
    _, slot = _incubating()
    before = [(c.seed, c.state) for c in slot.candidates]
    with slot.leading("block2_post-norm"):
        assert slot.seed is before[3][0] and slot.state is before[3][1]
        assert {id(c.seed) for c in slot.candidates} == {id(seed) for seed, _ in before}
    assert [(c.seed, c.state) for c in slot.candidates] == before
    with pytest.raises(RuntimeError, match="inside"):
        with slot.leading("block2_post-depthwise"):
            raise RuntimeError("inside")
    assert [(c.seed, c.state) for c in slot.candidates] == before


# ============================================================================ checkpoints, governor


def _saved(model):
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_a_checkpoint_with_candidates_loads_into_the_same_candidates():
    model, slot = _incubating()
    saved = _saved(model)
    fresh = make_model()
    torch.manual_seed(123)  # other initial weights: the load must replace them
    fresh.germinate_candidates(CNN_BLUEPRINTS)
    fresh.load_state_dict(saved)
    assert_same_tensors(tensors(fresh), tensors(model))
    restored = fresh.seed_slot
    assert [(c.seed_id, c.state.stage) for c in restored.candidates] == [(c.seed_id, c.state.stage) for c in slot.candidates]
    assert all(torch.equal(a["cpu"], b["cpu"]) for a, b in zip(restored._candidate_generators, slot._candidate_generators))
    # The restored incubation ends as the saved one would.
    restored.keep_candidate("block2_post-norm")
    assert list(fresh.state_dict()) == list(make_lone_model("norm").state_dict())


@pytest.mark.parametrize("into", [[], ["conv_light"], ["conv_light", "depthwise"]], ids=["empty", "lone", "two"])
def test_a_checkpoint_with_candidates_does_not_load_into_other_candidates(into):
    model, _ = _incubating()
    saved = _saved(model)
    other = make_model()
    if into:
        other.germinate_candidates(into)
    with pytest.raises(RuntimeError, match="3 rival candidate"):
        other.load_state_dict(saved)


def test_a_checkpoint_without_candidates_drops_the_rivals():
    lone = make_lone_model("conv_light")
    model, slot = _incubating()
    model.load_state_dict(_saved(lone))
    assert not slot.has_rivals and slot.rivals is None
    assert_same_tensors(tensors(model), tensors(lone))


@pytest.mark.parametrize("reference", [False, True], ids=["fused snapshot", "reference snapshot"])
@pytest.mark.parametrize("clear", [True, False], ids=["clear_live_seed_state", "original"])
def test_governor_rollback_culls_every_candidate_and_restores_the_host(clear, reference):
    model = make_model()
    slot = germinate(model, CNN_BLUEPRINTS)
    slot.advance_stage(SeedStage.TRAINING)
    with reference_mode() if reference else contextlib.nullcontext():
        governor = TolariaGovernor(model, clear_live_seed_state=clear)
    assert not any(".seed." in k or ".rivals." in k for k in governor.last_good_state)
    host = host_tensors(model)
    events = []
    slot.on_telemetry = events.append
    optimizers = [sgd(model.get_host_parameters())] + [sgd(c.seed.parameters()) for c in slot.candidates]
    train_steps(model, optimizers, batches("cifar10", 2, 8), "classification")
    assert any(not torch.equal(v, host[k]) for k, v in host_tensors(model).items())

    with reference_mode() if reference else contextlib.nullcontext():
        governor.execute_rollback()
    assert_same_tensors(host_tensors(model), host)
    assert slot.seed is None and slot.rivals is None and not slot.has_rivals
    assert (slot.state is None) if clear else (slot.state.seed_id == "block2_post-conv_light")
    culled = [e.seed_id for e in events if e.event_type == TelemetryEventType.SEED_CULLED]
    assert culled == [f"block2_post-{b}" for b in CNN_BLUEPRINTS]
    assert not any(".seed." in k or ".rivals." in k for k in model.state_dict())


# ============================================================================ judgement


def _judged_model(task, slot_id=None, other=None):
    """Candidates in TRAINING at ``slot_id`` (default: the main slot) that change the output;
    ``other``: a slot holding a seed BLENDING at alpha 0.5."""
    slots = None if other is None else sorted([slot_id, other])
    model = make_model(task, slots=slots)
    if other is not None:
        model.germinate_seed("conv_light", "other", slot=other)
        model.slot(other).state.transition(SeedStage.TRAINING)
        model.slot(other).state.transition(SeedStage.BLENDING)
        model.slot(other).set_alpha(0.5)
    torch.manual_seed(GERMINATION_SEED)
    model.germinate_candidates(BLUEPRINTS[task], slot=slot_id)
    slot = model.slot(slot_id)
    slot.advance_stage(SeedStage.TRAINING)
    with torch.no_grad():  # the zero-initialised projections of lm seeds, so that each changes the output
        for candidate in slot.candidates:
            for name, param in candidate.seed.named_parameters():
                if not param.abs().sum():
                    param.normal_(std=0.05)
    return model, slot.slot_id


@pytest.mark.parametrize(
    "task, slot_id, other",
    [("cifar10", None, None), ("cifar10", "block2_post", "block3_post"), ("cifar10", "block3_post", "block2_post"),
     ("tinystories", None, None)],
    ids=["cnn", "cnn slot 2, blending seed in 3", "cnn slot 3, blending seed in 2", "transformer"],
)
def test_judge_candidates_equals_one_forward_per_configuration(task, slot_id, other):
    model, slot_id = _judged_model(task, slot_id, other)
    loader = batches(task, 3, 16, seed=5) if task == "cifar10" else batches(task, 2, 1, seed=5)
    model.eval()
    assert _shares_the_prefix(model)  # in eval, as judged: the shared pass is what is compared
    model.train()
    task_type = TASK_TYPE[task]
    before = tensors(model)
    shared = judge_candidates(model, slot_id, loader, nn.CrossEntropyLoss(), "cpu", task_type)
    each = judge_candidates_each(model, slot_id, loader, nn.CrossEntropyLoss(), "cpu", task_type)
    assert shared == each
    assert [c.seed_id for c in shared.candidates] == [c.seed_id for c in model.slot(slot_id).candidates]
    assert len({c.loss for c in shared.candidates} | {shared.baseline_loss}) == len(shared.candidates) + 1
    # Nothing of the model changed: weights, lead, alpha, train mode.
    assert_same_tensors(tensors(model), before)
    assert model.slot(slot_id).state.blueprint_id == BLUEPRINTS[task][0] and model.slot(slot_id).alpha == 0.0
    assert model.training
    lead = shared.value_of(model.slot(slot_id).state.seed_id)
    expected = shared.baseline_loss - lead.loss if task_type == "lm" else lead.accuracy - shared.baseline_accuracy
    assert lead.value == expected


def _values(*rows):
    return [CandidateValue(f"s{i}", "b", accuracy, loss, value) for i, (accuracy, loss, value) in enumerate(rows)]


@pytest.mark.parametrize(
    "rows, task_type, winner",
    [
        ([(60, 1.0, 2.0), (61, 0.9, 3.0)], "classification", "s1"),           # the highest value
        ([(60, 1.0, 2.0), (60, 0.9, 2.0)], "classification", "s1"),           # equal value: the lower loss
        ([(60, 0.9, 2.0), (70, 1.0, 2.0)], "classification", "s0"),           # ... not the higher accuracy
        ([(60, 1.0, 2.0), (60, 1.0, 2.0)], "classification", "s0"),           # all equal: the first named
        ([(60, 1.0, 0.1), (70, 0.9, 0.1)], "lm", "s1"),                       # lm, equal value: higher accuracy
        ([(70, 1.0, 0.1), (60, 0.5, 0.1)], "lm", "s0"),                       # ... not the lower loss
        ([(60, 1.0, math.nan), (10, 9.0, -5.0)], "classification", "s1"),    # a NaN value never wins
        ([(10, 9.0, -5.0), (60, 1.0, math.nan)], "lm", "s0"),
        ([(60, math.nan, 2.0), (60, 5.0, 2.0)], "classification", "s1"),     # nor a NaN loss in a tie
        ([(math.nan, 1.0, 0.1), (5, 1.0, 0.1)], "lm", "s1"),                 # nor a NaN accuracy in a tie
    ],
)
def test_winner_of(rows, task_type, winner):
    assert winner_of(_values(*rows), task_type).seed_id == winner


def test_judge_candidates_refuses_a_slot_without_seed_and_an_empty_loader():
    model = make_model()
    for judge in (judge_candidates, judge_candidates_each):
        with pytest.raises(ValueError, match="holds no seed"):
            judge(model, model.slot_id, batches("cifar10", 1, 4), nn.CrossEntropyLoss(), "cpu")
    germinate(model, CNN_BLUEPRINTS).advance_stage(SeedStage.TRAINING)
    for judge in (judge_candidates, judge_candidates_each):
        with pytest.raises(ValueError, match="no batch"):
            judge(model, model.slot_id, [], nn.CrossEntropyLoss(), "cpu")


def test_a_judgement_log_names_the_winner():
    model, slot_id = _judged_model("cifar10")
    judgement = judge_candidates(model, slot_id, batches("cifar10", 2, 16, seed=5), nn.CrossEntropyLoss(), "cpu")
    log = judgement.to_log()
    assert log["winner"] == judgement.winner.seed_id == winner_of(judgement.candidates).seed_id
    assert [c["seed_id"] for c in log["candidates"]] == [f"block2_post-{b}" for b in CNN_BLUEPRINTS]
    assert copy.deepcopy(judgement) == judgement
