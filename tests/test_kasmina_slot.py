"""SeedSlot: stages and transitions, gates, the lifecycle, alpha control, and the forward pass."""

import itertools

import pytest
import torch

from esper_fast.kasmina import (
    AlphaSchedule,
    GateLevel,
    InvalidTransitionError,
    QualityGates,
    SeedMetrics,
    SeedSlot,
    SeedStage,
    SeedState,
)
from esper_fast.kasmina import slot as slot_module
from esper_fast.kasmina.stages import ACTIVE_STAGES, VALID_TRANSITIONS
from esper_fast.runtime import TaskConfig

STAGE_VALUES = {
    "UNKNOWN": 0, "DORMANT": 1, "GERMINATED": 2, "TRAINING": 3, "BLENDING": 4, "SHADOWING": 5,
    "PROBATIONARY": 6, "FOSSILIZED": 7, "CULLED": 8, "EMBARGOED": 9, "RESETTING": 10,
}
S = SeedStage
LEGAL = {
    (S.DORMANT, S.GERMINATED),
    (S.GERMINATED, S.TRAINING), (S.GERMINATED, S.CULLED),
    (S.TRAINING, S.BLENDING), (S.TRAINING, S.CULLED),
    (S.BLENDING, S.SHADOWING), (S.BLENDING, S.CULLED),
    (S.SHADOWING, S.PROBATIONARY), (S.SHADOWING, S.CULLED),
    (S.PROBATIONARY, S.FOSSILIZED), (S.PROBATIONARY, S.CULLED),
    (S.CULLED, S.EMBARGOED), (S.EMBARGOED, S.RESETTING), (S.RESETTING, S.DORMANT),
}


def transformer_config():
    return TaskConfig.for_tinystories()


def make_slot(stage=S.GERMINATED, blueprint="conv_light", channels=8, topology="cnn", **kwargs):
    """A slot holding a germinated seed, moved to ``stage`` along the legal path."""
    config = transformer_config() if topology == "transformer" else None
    slot = SeedSlot("slot", channels, task_config=config, **kwargs)
    slot.germinate(blueprint, seed_id="seed")
    path = [S.TRAINING, S.BLENDING, S.SHADOWING, S.PROBATIONARY, S.FOSSILIZED]
    for target in path[: path.index(stage) + 1] if stage in path else []:
        slot.state.transition(target)
    return slot


def host_input(topology="cnn", channels=8):
    shape = (2, channels, 5, 5) if topology == "cnn" else (2, 3, channels)
    return torch.randn(shape, requires_grad=True)


# ---------------------------------------------------------------- stages


def test_stage_enum_values():
    assert {stage.name: stage.value for stage in SeedStage} == STAGE_VALUES
    assert slot_module.SeedStage is SeedStage


def test_transition_table_is_exactly_the_lifecycle():
    table = {(a, b) for a, targets in VALID_TRANSITIONS.items() for b in targets}
    assert table == LEGAL
    assert ACTIVE_STAGES == {S.TRAINING, S.BLENDING, S.SHADOWING, S.PROBATIONARY, S.FOSSILIZED}


@pytest.mark.parametrize(
    "current,target", list(itertools.product(SeedStage, SeedStage)), ids=lambda s: s.name
)
def test_seed_state_transition_allows_only_legal_moves(current, target):
    state = SeedState(seed_id="s", blueprint_id="norm", stage=current)
    if (current, target) in LEGAL:
        assert state.transition(target) is True
        assert state.stage == target and state.previous_stage == current
        assert state.stage_history[-1][:2] == (current, target)
    else:
        with pytest.raises(InvalidTransitionError, match=f"{current.name} -> {target.name}"):
            state.transition(target)
        assert state.stage == current and len(state.stage_history) == 0


def test_invalid_transition_error_is_a_value_error_listing_the_allowed_stages():
    state = SeedState(seed_id="s", blueprint_id="norm", stage=S.TRAINING)
    with pytest.raises(ValueError, match="allowed from TRAINING: BLENDING, CULLED"):
        state.transition(S.FOSSILIZED)


def test_transition_resets_the_stage_baseline():
    state = SeedState(seed_id="s", blueprint_id="norm", stage=S.TRAINING)
    state.metrics.record_accuracy(40.0)
    state.metrics.record_accuracy(45.0)
    assert state.epochs_in_stage == 2
    state.transition(S.BLENDING)
    assert state.epochs_in_stage == 0
    assert state.metrics.accuracy_at_stage_start == 45.0
    assert state.metrics.accuracy_at_blending_start == 45.0


def test_seed_metrics_record_accuracy():
    metrics = SeedMetrics()
    assert metrics.blending_delta == 0.0 and metrics.counterfactual_contribution is None
    for acc in (30.0, torch.tensor(50.0), 45.0):
        metrics.record_accuracy(acc)
    assert metrics.accuracy_at_germination == metrics.initial_val_accuracy == 30.0
    assert metrics.current_val_accuracy == 45.0
    assert metrics.best_val_accuracy == 50.0
    assert metrics.total_improvement == 15.0
    assert metrics.epochs_total == 3
    assert isinstance(metrics.current_val_accuracy, float)


# ---------------------------------------------------------------- gates


def state_in(stage, **metrics):
    state = SeedState(seed_id="s", blueprint_id="norm", stage=stage)
    for name, value in metrics.items():
        setattr(state.metrics, name, value)
    return state


def test_g0_requires_ids():
    gates = QualityGates()
    assert gates.check_gate(SeedState(seed_id="s", blueprint_id="b"), S.GERMINATED).passed
    result = gates.check_gate(SeedState(seed_id="", blueprint_id="b"), S.GERMINATED)
    assert result.gate == GateLevel.G0 and not result.passed and result.checks_failed == ["seed_id_present"]


def test_g1_requires_germinated():
    gates = QualityGates()
    assert gates.check_gate(state_in(S.GERMINATED), S.TRAINING).passed
    assert not gates.check_gate(state_in(S.DORMANT), S.TRAINING).passed


def test_g2_requires_improvement_and_training_age():
    gates = QualityGates(min_training_improvement=0.5, min_blending_epochs=3)
    ready = state_in(S.TRAINING, current_val_accuracy=41.0, accuracy_at_stage_start=40.0, epochs_in_current_stage=3)
    assert gates.check_gate(ready, S.BLENDING).passed
    flat = state_in(S.TRAINING, current_val_accuracy=40.2, accuracy_at_stage_start=40.0, epochs_in_current_stage=3)
    result = gates.check_gate(flat, S.BLENDING)
    assert result.gate == GateLevel.G2 and not result.passed and result.checks_failed == ["improvement_0.20"]
    young = state_in(S.TRAINING, current_val_accuracy=45.0, accuracy_at_stage_start=40.0, epochs_in_current_stage=2)
    assert gates.check_gate(young, S.BLENDING).checks_failed == ["seed_trained_long_enough"]


def test_g3_requires_blending_epochs_and_high_alpha():
    gates = QualityGates(min_blending_epochs=3)
    state = state_in(S.BLENDING, epochs_in_current_stage=3)
    state.alpha = 0.96
    assert gates.check_gate(state, S.SHADOWING).passed
    state.alpha = 0.5
    assert gates.check_gate(state, S.SHADOWING).checks_failed == ["alpha_0.50"]


def test_g4_requires_shadowing():
    gates = QualityGates()
    assert gates.check_gate(state_in(S.SHADOWING), S.PROBATIONARY).passed
    assert not gates.check_gate(state_in(S.BLENDING), S.PROBATIONARY).passed


def test_g5_uses_counterfactual_contribution_when_measured():
    gates = QualityGates()
    assert gates.check_gate(state_in(S.PROBATIONARY, counterfactual_contribution=1.5), S.FOSSILIZED).passed
    hurts = state_in(S.PROBATIONARY, counterfactual_contribution=-0.5, current_val_accuracy=60.0)
    assert gates.check_gate(hurts, S.FOSSILIZED).checks_failed == ["contribution_-0.50"]
    # without a measurement, total improvement decides
    assert gates.check_gate(state_in(S.PROBATIONARY, current_val_accuracy=5.0), S.FOSSILIZED).passed
    assert not gates.check_gate(state_in(S.PROBATIONARY), S.FOSSILIZED).passed
    unhealthy = state_in(S.PROBATIONARY, counterfactual_contribution=3.0)
    unhealthy.is_healthy = False
    assert gates.check_gate(unhealthy, S.FOSSILIZED).checks_failed == ["healthy"]


def test_ungated_stages_pass():
    assert QualityGates().check_gate(state_in(S.TRAINING), S.CULLED).passed


# ---------------------------------------------------------------- germinate / advance / cull


def test_germinate_enters_germinated_with_counts():
    host = torch.nn.Linear(4, 4)
    slot = SeedSlot("block2_post", 16)
    state = slot.germinate("conv_light", host_module=host)
    assert slot.is_active and state is slot.state
    assert state.stage == S.GERMINATED and state.previous_stage == S.DORMANT
    assert state.seed_id == "block2_post-conv_light" and state.slot_id == "block2_post"
    assert state.metrics.seed_param_count == slot.active_seed_params > 0
    assert state.metrics.host_param_count == 20
    assert list(slot.get_parameters()) == list(slot.seed.parameters())


def test_germinate_twice_raises_and_unknown_blueprint_lists_choices():
    slot = make_slot(S.TRAINING)
    with pytest.raises(RuntimeError, match="already holds seed"):
        slot.germinate("norm")
    empty = SeedSlot("s", 8)
    with pytest.raises(ValueError, match=r"unknown blueprint 'lora'.*conv_light"):
        empty.germinate("lora")
    assert not empty.is_active and empty.state is None


def test_germinate_after_cull_is_allowed():
    slot = make_slot(S.BLENDING)
    assert slot.cull("bad")
    slot.germinate("norm", seed_id="second")
    assert slot.state.seed_id == "second" and slot.state.stage == S.GERMINATED and slot.alpha == 0.0


def test_to_moves_where_new_seeds_go():
    slot = SeedSlot("s", 8)
    assert slot.to("meta") is slot and slot.device == torch.device("meta")
    slot.to(torch.float64)
    assert slot.device == torch.device("meta")
    slot.germinate("norm")
    assert slot.seed.scale.device.type == "meta"
    assert slot._alpha_value.device.type == "meta"


def test_empty_slot():
    slot = SeedSlot("s", 8)
    assert not slot.is_active and slot.state is None and slot.alpha == 0.0
    assert list(slot.get_parameters()) == [] and slot.active_seed_params == 0
    slot.set_alpha(0.5)
    assert slot.alpha == 0.0
    result = slot.advance_stage()
    assert not result.passed and result.checks_failed == ["no_active_seed"]
    assert slot.cull() is False


def test_advance_stage_defaults_to_the_next_stage_and_sets_isolation():
    slot = make_slot(S.GERMINATED)
    assert not slot.isolate_gradients
    assert slot.advance_stage().passed
    assert slot.state.stage == S.TRAINING and slot.isolate_gradients


def test_advance_stage_to_an_illegal_stage_raises():
    slot = make_slot(S.TRAINING)
    with pytest.raises(InvalidTransitionError, match="TRAINING -> FOSSILIZED"):
        slot.advance_stage(S.FOSSILIZED)
    assert slot.state.stage == S.TRAINING


def test_advance_stage_failed_gate_keeps_stage():
    slot = make_slot(S.TRAINING)
    result = slot.advance_stage(S.BLENDING)
    assert not result.passed and result.gate == GateLevel.G2
    assert slot.state.stage == S.TRAINING


def test_advance_to_blending_starts_the_alpha_ramp_and_lets_seed_and_host_co_adapt():
    slot = make_slot(S.TRAINING, gates=QualityGates(min_training_improvement=0.0, min_blending_epochs=0))
    slot.isolate_gradients = True
    assert slot.advance_stage(S.BLENDING).passed
    assert not slot.isolate_gradients
    assert isinstance(slot.alpha_schedule, AlphaSchedule)
    assert slot.state.blending_steps_total == slot_module.DEFAULT_BLENDING_STEPS


@pytest.mark.parametrize("stage", [S.GERMINATED, S.TRAINING, S.BLENDING, S.SHADOWING, S.PROBATIONARY], ids=lambda s: s.name)
def test_cull_drops_seed_and_state(stage):
    events = []
    slot = make_slot(stage, on_telemetry=events.append)
    slot.set_alpha(0.4)
    assert slot.cull("test") is True
    assert slot.seed is None and slot.state is None and slot.alpha == 0.0
    assert not slot.is_active and not slot.isolate_gradients and slot.alpha_schedule is None
    assert [e.event_type for e in events[-2:]] == ["stage_changed", "culled"]
    assert events[-2].data == {"from_stage": stage.name, "to_stage": "CULLED"}
    assert events[-1].data["reason"] == "test"


def test_cull_refuses_a_fossilized_seed():
    slot = make_slot(S.FOSSILIZED)
    seed = slot.seed
    assert slot.cull("too late") is False
    assert slot.seed is seed and slot.state.stage == S.FOSSILIZED


def test_telemetry_events_and_fast_mode():
    events = []
    slot = SeedSlot("s", 8, on_telemetry=events.append)
    slot.germinate("norm", seed_id="x")
    slot.advance_stage()
    assert [e.event_type for e in events] == ["germinated", "gate_evaluated", "stage_changed"]
    assert all(e.slot_id == "s" and e.seed_id == "x" for e in events)
    quiet = []
    fast = SeedSlot("s", 8, on_telemetry=quiet.append, fast_mode=True)
    fast.germinate("norm")
    fast.advance_stage()
    assert quiet == []


# ---------------------------------------------------------------- lifecycle


def test_full_lifecycle_through_step_epoch():
    config = TaskConfig.for_cifar10()  # max_epochs 25 * fraction 0.1 -> 2 dwell epochs; ramp of 5
    slot = SeedSlot("s", 8, task_config=config)
    slot.germinate("norm")
    accuracy = iter(range(40, 100))

    def epoch():
        slot.state.metrics.record_accuracy(float(next(accuracy)))
        slot.step_epoch()

    slot.step_epoch()
    assert slot.state.stage == S.TRAINING and slot.isolate_gradients
    epoch(); epoch()
    assert slot.state.stage == S.TRAINING  # G2 also needs 3 epochs in TRAINING
    epoch()
    assert slot.state.stage == S.BLENDING and not slot.isolate_gradients
    assert slot.alpha == 0.0 and slot.state.blending_steps_total == config.blending_steps

    alphas = []
    while slot.state.stage == S.BLENDING:
        epoch()
        alphas.append(slot.alpha)
    assert alphas == sorted(alphas) and 0.0 < alphas[0] < 1.0
    assert len(alphas) == config.blending_steps and alphas[-1] == 1.0
    assert slot.state.stage == S.SHADOWING

    epoch()
    assert slot.state.stage == S.SHADOWING
    epoch()
    assert slot.state.stage == S.PROBATIONARY
    epoch()
    assert slot.state.stage == S.PROBATIONARY  # fossilization is the caller's decision

    slot.state.metrics.counterfactual_contribution = 2.0
    assert slot.advance_stage().passed
    assert slot.state.stage == S.FOSSILIZED and slot.alpha == 1.0
    slot.step_epoch()
    assert slot.state.stage == S.FOSSILIZED
    stages = [to for _, to, _ in slot.state.stage_history]
    assert stages == [S.GERMINATED, S.TRAINING, S.BLENDING, S.SHADOWING, S.PROBATIONARY, S.FOSSILIZED]


# ---------------------------------------------------------------- alpha


@pytest.mark.parametrize("value,expected", [(-0.5, 0.0), (0.0, 0.0), (0.25, 0.25), (1.0, 1.0), (7.0, 1.0)])
def test_set_alpha_clamps(value, expected):
    slot = make_slot(S.BLENDING)
    slot.set_alpha(value)
    assert slot.alpha == expected == slot.state.metrics.current_alpha


def test_start_blending_and_update_alpha_for_step_follow_the_schedule():
    slot = make_slot(S.BLENDING)
    slot.start_blending(10, temperature=2.0)
    schedule = AlphaSchedule(10, temperature=2.0)
    for step in (0, 3, 5, 9, 10, 12):
        assert slot.update_alpha_for_step(step) == schedule(step) == slot.alpha
    assert slot.state.metrics.alpha_ramp_step == 12


def test_force_alpha_overrides_and_restores():
    slot = make_slot(S.BLENDING)
    slot.start_blending(4)
    slot.set_alpha(0.7)
    schedule = slot.alpha_schedule
    with slot.force_alpha(0.0):
        assert slot.alpha == 0.0 and slot.alpha_schedule is None
    assert slot.alpha == 0.7 and slot.alpha_schedule is schedule


def test_force_alpha_restores_on_error():
    slot = make_slot(S.BLENDING)
    slot.set_alpha(0.3)
    with pytest.raises(KeyError):
        with slot.force_alpha(1.0):
            assert slot.alpha == 1.0
            raise KeyError("boom")
    assert slot.alpha == 0.3


def test_force_alpha_without_state_is_a_no_op():
    slot = SeedSlot("s", 8)
    with slot.force_alpha(0.0):
        assert slot.alpha == 0.0 and slot.state is None
    assert slot.state is None


def test_force_alpha_changes_the_forward():
    slot = make_slot(S.BLENDING)
    slot.set_alpha(1.0)
    x = torch.randn(2, 8, 5, 5)
    with slot.force_alpha(0.0):
        torch.testing.assert_close(slot(x), x, rtol=0, atol=0)
    torch.testing.assert_close(slot(x), slot.seed(x), rtol=0, atol=0)


# ---------------------------------------------------------------- forward


def capture_seed_output(slot):
    """Keep the seed's output (with retained grad) from its first forward after this call."""
    captured = {}

    def hook(module, args, output):
        if "out" not in captured:
            output.retain_grad()
            captured["out"] = output

    slot.seed.register_forward_hook(hook)
    return captured


def test_empty_slot_forward_is_the_host_features():
    slot = SeedSlot("s", 8)
    x = host_input()
    assert slot(x) is x


@pytest.mark.parametrize("stage", [S.GERMINATED, S.CULLED], ids=lambda s: s.name)
def test_inactive_stage_forward_is_the_host_features(stage):
    slot = make_slot(S.GERMINATED)
    if stage == S.CULLED:
        slot.state.transition(S.CULLED)  # a culled state still in place must not run the seed
    x = host_input()
    assert slot(x) is x


def test_training_alpha_zero_is_a_straight_through_estimator():
    slot = make_slot(S.TRAINING)
    slot.isolate_gradients = True
    captured = capture_seed_output(slot)
    x = host_input()
    y = slot(x)
    assert torch.equal(y, x)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, g)  # host path: the gradient unchanged, nothing via the detached seed input
    assert torch.equal(captured["out"].grad, g)  # seed output: the same gradient
    assert all(p.grad is not None for p in slot.seed.parameters())


def test_isolate_gradients_detaches_the_seed_input():
    slot = make_slot(S.TRAINING)
    slot.isolate_gradients = False
    x = host_input()
    g = torch.randn(2, 8, 5, 5)
    slot(x).backward(g)
    # without isolation the host also receives the seed branch's gradient
    assert not torch.allclose(x.grad, g)
    expected = g + torch.autograd.grad(slot.seed(x), x, g)[0]
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("stage", [S.BLENDING, S.SHADOWING, S.PROBATIONARY, S.FOSSILIZED], ids=lambda s: s.name)
def test_cnn_blend_is_lerp_with_the_host_path_detached(stage):
    slot = make_slot(stage)
    slot.set_alpha(0.3)
    slot.isolate_gradients = True  # so only the blend's host path could reach x
    x = host_input()
    y = slot(x)
    torch.testing.assert_close(y, torch.lerp(x, slot.seed(x), 0.3))
    y.sum().backward()
    assert x.grad is None
    assert all(p.grad is not None for p in slot.seed.parameters())


def test_training_with_nonzero_alpha_blends():
    slot = make_slot(S.TRAINING)
    slot.set_alpha(0.5)
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(slot(x), torch.lerp(x, slot.seed(x), 0.5))


@pytest.mark.parametrize("stage", [S.BLENDING, S.SHADOWING, S.PROBATIONARY, S.FOSSILIZED], ids=lambda s: s.name)
def test_transformer_blend_keeps_the_host_gradient(stage):
    slot = make_slot(stage, blueprint="lora", channels=16, topology="transformer")
    slot.set_alpha(0.25)
    slot.isolate_gradients = True
    captured = capture_seed_output(slot)
    x = host_input("transformer", 16)
    y = slot(x)
    torch.testing.assert_close(y, torch.lerp(x, slot.seed(x), 0.25))
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, 0.75 * g)
    torch.testing.assert_close(captured["out"].grad, 0.25 * g)


def test_transformer_training_with_alpha_detaches_the_host():
    slot = make_slot(S.TRAINING, blueprint="lora", channels=16, topology="transformer")
    slot.set_alpha(0.5)
    slot.isolate_gradients = True
    x = host_input("transformer", 16)
    slot(x).sum().backward()
    assert x.grad is None


def test_channels_last_host_features_blend():
    slot = make_slot(S.BLENDING, blueprint="depthwise", channels=16)
    slot.set_alpha(0.6)
    x = torch.randn(2, 16, 6, 6).to(memory_format=torch.channels_last)
    torch.testing.assert_close(slot(x), torch.lerp(x, slot.seed(x), 0.6))


# ---------------------------------------------------------------- torch.compile


def test_compiled_slot_in_training_is_a_straight_through_estimator():
    slot = make_slot(S.TRAINING, blueprint="norm")
    slot.isolate_gradients = True
    # aot_eager traces dynamo and AOT autograd (fake kernels, registered autograd) in seconds.
    compiled = torch.compile(slot, fullgraph=True, backend="aot_eager")
    x = host_input()
    y = compiled(x)
    assert torch.equal(y, x)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, g)
    assert slot.seed.scale.grad is not None


def test_compiled_slot_in_blending_is_lerp():
    slot = make_slot(S.BLENDING, blueprint="norm")
    with torch.no_grad():
        slot.seed.scale.fill_(0.5)
    compiled = torch.compile(slot, fullgraph=True, backend="aot_eager")
    x = host_input()
    for alpha in (0.2, 0.8):
        slot.set_alpha(alpha)
        x.grad = None
        y = compiled(x)
        torch.testing.assert_close(y, torch.lerp(x, slot.seed(x), alpha))
        y.sum().backward()
        # isolate_gradients is off in BLENDING: the host gets gradient only through the seed branch
        expected = torch.autograd.grad(slot.seed(x), x, torch.full_like(x, alpha))[0]
        torch.testing.assert_close(x.grad, expected)


def test_compiled_slot_follows_the_alpha_ramp_without_recompiling():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    slot = make_slot(S.BLENDING, blueprint="norm")
    compiled = torch.compile(slot, fullgraph=True, backend="aot_eager")
    x = host_input()
    for alpha in (0.1, 0.3, 0.5, 0.7, 0.9, 1.0):
        slot.set_alpha(alpha)
        torch.testing.assert_close(compiled(x), slot(x))
    with slot.force_alpha(0.0):
        torch.testing.assert_close(compiled(x), x)
    torch.testing.assert_close(compiled(x), slot(x))  # alpha 1.0 back after force_alpha
    assert counters["stats"]["unique_graphs"] == 1
