"""SeedSlot and its parts: SeedMetrics, SeedState, QualityGates, GradientIsolationMonitor, the
lifecycle (germinate / advance_stage / step_epoch / cull), alpha control, telemetry,
checkpoints, and the fused forward (STE and blend) with and without torch.compile.

Every expectation is the original esper-lite's behaviour, stated here as a fact."""

import dataclasses
import inspect
import io
import itertools
import math
import pickle
from collections import deque
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from esper_fast.kasmina import (
    AlphaSchedule,
    BlueprintRegistry,
    CNNHost,
    GateLevel,
    GateResult,
    GradientIsolationMonitor,
    InvalidTransitionError,
    MorphogeneticModel,
    QualityGates,
    SeedMetrics,
    SeedSlot,
    SeedStage,
    SeedState,
    VALID_TRANSITIONS,
    blend_with_isolation,
    ste_forward,
)
from esper_fast.leyline import SeedMetrics as LeylineSeedMetrics
from esper_fast.leyline import SeedStateReport, SeedTelemetry, TelemetryEventType
from esper_fast.runtime import TaskConfig
from tolerances import assert_close

S = SeedStage
E = TelemetryEventType
PATH = [S.TRAINING, S.BLENDING, S.SHADOWING, S.PROBATIONARY, S.FOSSILIZED]
LIVE_STAGES = [S.GERMINATED, S.TRAINING, S.BLENDING, S.SHADOWING, S.PROBATIONARY]
CNN_NAMES = ["norm", "attention", "depthwise", "conv_light", "conv_heavy"]


def make_slot(stage=S.GERMINATED, blueprint="conv_light", channels=8, topology="cnn", **kwargs):
    """A slot with a germinated seed, walked to ``stage`` along the lifecycle by SeedState."""
    config = TaskConfig.for_tinystories() if topology == "transformer" else kwargs.pop("task_config", None)
    slot = SeedSlot("slot", channels, task_config=config, **kwargs)
    slot.germinate(blueprint, seed_id="seed")
    for target in PATH[: PATH.index(stage) + 1] if stage in PATH else []:
        assert slot.state.transition(target)
    return slot


def ids(params):
    return [id(p) for p in params]


def state_in(stage=S.TRAINING, seed_id="s", blueprint_id="b", alpha=0.0, healthy=True, **metrics):
    state = SeedState(seed_id=seed_id, blueprint_id=blueprint_id, stage=stage, alpha=alpha, is_healthy=healthy)
    for name, value in metrics.items():
        setattr(state.metrics, name, value)
    return state


def host_input(topology="cnn", channels=8, device="cpu"):
    shape = (2, channels, 5, 5) if topology == "cnn" else (2, 3, channels)
    return torch.randn(shape, device=device, requires_grad=True)


@pytest.fixture
def scratch_blueprints():
    """Register test blueprints freely; they are removed afterwards."""
    added = []

    def register(name, factory, topology="cnn", param_estimate=1):
        BlueprintRegistry.register(name, topology, param_estimate=param_estimate)(factory)
        added.append((topology, name))

    yield register
    for topology, name in added:
        BlueprintRegistry.unregister(topology, name)


# ============================================================================ SeedMetrics


def test_seed_metrics_fields_and_defaults():
    m = SeedMetrics()
    assert [(f.name, getattr(m, f.name)) for f in dataclasses.fields(SeedMetrics)] == [
        ("epochs_total", 0), ("epochs_in_current_stage", 0), ("initial_val_accuracy", 0.0),
        ("current_val_accuracy", 0.0), ("best_val_accuracy", 0.0), ("accuracy_at_stage_start", 0.0),
        ("accuracy_at_blending_start", 0.0), ("isolation_violations", 0), ("gradient_norm_avg", 0.0),
        ("current_alpha", 0.0), ("alpha_ramp_step", 0), ("counterfactual_contribution", None),
        ("seed_gradient_norm_ratio", 0.0),
    ]
    assert hasattr(SeedMetrics, "__slots__")
    with pytest.raises(AttributeError):
        m.not_a_metric = 1


def test_record_accuracy_sets_the_baselines_on_the_first_record_and_tracks_the_best():
    m = SeedMetrics()
    m.record_accuracy(30.0)
    assert (m.initial_val_accuracy, m.accuracy_at_stage_start, m.current_val_accuracy) == (30.0, 30.0, 30.0)
    m.record_accuracy(torch.tensor(50.0))
    m.record_accuracy(45.0)
    assert m.initial_val_accuracy == 30.0 and m.accuracy_at_stage_start == 30.0
    assert m.current_val_accuracy == 45.0 and type(m.current_val_accuracy) is float
    assert m.best_val_accuracy == 50.0
    assert (m.epochs_total, m.epochs_in_current_stage) == (3, 3)
    assert m.total_improvement == 15.0 and m.improvement_since_stage_start == 15.0


def test_record_accuracy_baseline_needs_epochs_total_zero():
    # an epoch counted before the first record means the initial accuracy is never taken
    state = SeedState(seed_id="s", blueprint_id="b")
    state.increment_epoch()
    state.record_epoch(60.0)
    m = state.metrics
    assert m.initial_val_accuracy == 0.0 and m.accuracy_at_stage_start == 0.0
    assert m.total_improvement == 60.0 and m.epochs_total == 2


def test_best_accuracy_starts_at_zero():
    m = SeedMetrics()
    m.record_accuracy(-5.0)
    assert m.best_val_accuracy == 0.0 and m.initial_val_accuracy == -5.0


@pytest.mark.parametrize(
    "at_blending_start,current,delta", [(0.0, 70.0, 0.0), (50.0, 53.5, 3.5), (50.0, 48.0, -2.0)]
)
def test_blending_delta(at_blending_start, current, delta):
    m = SeedMetrics(accuracy_at_blending_start=at_blending_start, current_val_accuracy=current)
    assert m.blending_delta == delta


def test_reset_stage_baseline():
    m = SeedMetrics(current_val_accuracy=44.0, accuracy_at_stage_start=40.0, epochs_in_current_stage=5)
    m.reset_stage_baseline()
    assert (m.accuracy_at_stage_start, m.epochs_in_current_stage) == (44.0, 0)


def test_to_leyline_carries_the_computed_improvements():
    m = SeedMetrics(
        epochs_total=9, epochs_in_current_stage=2, initial_val_accuracy=30.0, current_val_accuracy=42.0,
        best_val_accuracy=43.0, accuracy_at_stage_start=40.0, accuracy_at_blending_start=41.0,
        isolation_violations=1, gradient_norm_avg=0.5, current_alpha=0.25, alpha_ramp_step=3,
        counterfactual_contribution=1.0, seed_gradient_norm_ratio=0.2,
    )
    report = m.to_leyline()
    assert type(report) is LeylineSeedMetrics
    assert report == LeylineSeedMetrics(
        epochs_total=9, epochs_in_current_stage=2, initial_val_accuracy=30.0, current_val_accuracy=42.0,
        best_val_accuracy=43.0, accuracy_at_stage_start=40.0, total_improvement=12.0,
        improvement_since_stage_start=2.0, isolation_violations=1, gradient_norm_avg=0.5,
        current_alpha=0.25, alpha_ramp_step=3,
    )


# ============================================================================ SeedState


def test_seed_state_is_keyword_only():
    with pytest.raises(TypeError):
        SeedState("s", "b")
    with pytest.raises(TypeError):
        SeedState(seed_id="s")  # blueprint_id is required


def test_seed_state_fields_and_defaults():
    state = SeedState(seed_id="s", blueprint_id="b")
    assert [f.name for f in dataclasses.fields(SeedState)] == [
        "seed_id", "blueprint_id", "slot_id", "stage", "previous_stage", "previous_epochs_in_stage",
        "stage_entered_at", "alpha", "metrics", "blending_steps_done", "blending_steps_total", "is_healthy",
        "is_paused", "stage_history", "telemetry",
    ]
    assert (state.slot_id, state.stage, state.previous_stage, state.previous_epochs_in_stage) == (
        "", S.DORMANT, S.UNKNOWN, 0
    )
    assert (state.alpha, state.blending_steps_done, state.blending_steps_total) == (0.0, 0, 0)
    assert (state.is_healthy, state.is_paused) == (True, False)
    assert state.metrics == SeedMetrics()
    assert isinstance(state.stage_history, deque) and state.stage_history.maxlen == 100
    assert len(state.stage_history) == 0
    assert state.stage_entered_at.tzinfo is timezone.utc


def test_seed_state_creates_its_telemetry():
    state = SeedState(seed_id="s1", blueprint_id="norm")
    assert isinstance(state.telemetry, SeedTelemetry)
    assert (state.telemetry.seed_id, state.telemetry.blueprint_id) == ("s1", "norm")
    given = SeedTelemetry(seed_id="other")
    assert SeedState(seed_id="s1", blueprint_id="norm", telemetry=given).telemetry is given


def test_sync_telemetry():
    state = state_in(S.BLENDING, alpha=0.4, current_val_accuracy=55.0, accuracy_at_stage_start=50.0,
                     epochs_in_current_stage=3)
    before = state.telemetry.captured_at
    state.sync_telemetry(gradient_norm=2.0, gradient_health=0.7, has_vanishing=True, has_exploding=False,
                         epoch=4, max_epochs=30)
    t = state.telemetry
    assert (t.accuracy, t.accuracy_delta, t.epochs_in_stage, t.stage, t.alpha) == (55.0, 5.0, 3, 4, 0.4)
    assert (t.gradient_norm, t.gradient_health, t.has_vanishing, t.has_exploding) == (2.0, 0.7, True, False)
    assert (t.epoch, t.max_epochs) == (4, 30)
    assert t.captured_at >= before
    state.sync_telemetry(0.0, 1.0, False, False)
    assert (t.epoch, t.max_epochs) == (0, 25)


LEGAL = {(a, b) for a, targets in VALID_TRANSITIONS.items() for b in targets}


@pytest.mark.parametrize(
    "current,target", list(itertools.product(SeedStage, SeedStage)), ids=lambda s: s.name
)
def test_seed_state_transition(current, target):
    state = state_in(current, current_val_accuracy=47.0, accuracy_at_stage_start=40.0, epochs_in_current_stage=4)
    entered = state.stage_entered_at
    if (current, target) in LEGAL:
        assert state.transition(target) is True
        assert (state.stage, state.previous_stage, state.previous_epochs_in_stage) == (target, current, 4)
        assert state.stage_entered_at >= entered and state.stage_entered_at.tzinfo is timezone.utc
        assert list(state.stage_history) == [(target, state.stage_entered_at)]
        assert (state.metrics.accuracy_at_stage_start, state.metrics.epochs_in_current_stage) == (47.0, 0)
    else:
        assert state.transition(target) is False
        assert (state.stage, state.previous_stage, state.previous_epochs_in_stage) == (current, S.UNKNOWN, 0)
        assert state.stage_entered_at == entered and len(state.stage_history) == 0
        assert (state.metrics.accuracy_at_stage_start, state.metrics.epochs_in_current_stage) == (40.0, 4)
    assert state.can_transition_to(target) is ((state.stage, target) in LEGAL)


def test_state_transition_does_not_snapshot_blending_start():
    state = state_in(S.TRAINING, current_val_accuracy=45.0)
    state.transition(S.BLENDING)
    assert state.metrics.accuracy_at_blending_start == 0.0  # the slot takes that snapshot


def test_stage_history_entries_and_bound():
    state = SeedState(seed_id="s", blueprint_id="b")
    cycle = [S.GERMINATED, S.CULLED, S.EMBARGOED, S.RESETTING, S.DORMANT]
    for target in cycle * 30:
        assert state.transition(target)
    assert len(state.stage_history) == 100
    stage, when = state.stage_history[-1]
    assert stage == S.DORMANT and isinstance(when, datetime) and when == state.stage_entered_at
    assert [entry[0] for entry in list(state.stage_history)[:5]] == cycle
    assert all(len(entry) == 2 for entry in state.stage_history)


def test_increment_and_record_epoch():
    state = SeedState(seed_id="s", blueprint_id="b")
    state.increment_epoch()
    assert (state.metrics.epochs_total, state.epochs_in_stage, state.metrics.current_val_accuracy) == (1, 1, 0.0)
    state.record_epoch(12.0)
    assert (state.metrics.epochs_total, state.epochs_in_stage, state.metrics.current_val_accuracy) == (2, 2, 12.0)


@pytest.mark.parametrize(
    "healthy,violations,current,improving,attention",
    [(True, 0, 42.0, True, False), (True, 2, 40.0, False, True), (False, 0, 39.0, False, True)],
)
def test_to_report(healthy, violations, current, improving, attention):
    state = state_in(S.SHADOWING, healthy=healthy, isolation_violations=violations, current_val_accuracy=current,
                     accuracy_at_stage_start=40.0)
    state.slot_id = "block2_post"
    state.previous_stage, state.previous_epochs_in_stage = S.BLENDING, 5
    report = state.to_report()
    assert isinstance(report, SeedStateReport)
    assert (report.seed_id, report.slot_id, report.blueprint_id) == ("s", "block2_post", "b")
    assert (report.stage, report.previous_stage, report.previous_epochs_in_stage) == (S.SHADOWING, S.BLENDING, 5)
    assert report.stage_entered_at == state.stage_entered_at
    assert report.metrics == state.metrics.to_leyline()
    assert (report.is_healthy, report.is_improving, report.needs_attention) == (healthy, improving, attention)
    assert report.annotations == {}


# ============================================================================ QualityGates


def test_quality_gates_arguments_and_defaults():
    params = list(inspect.signature(QualityGates).parameters.values())
    assert [(p.name, p.default) for p in params[:6]] == [
        ("min_training_improvement", 0.5), ("min_blending_epochs", 3), ("max_isolation_violations", 10),
        ("min_shadowing_correlation", 0.9), ("min_probation_stability", 0.95), ("min_seed_gradient_ratio", 0.05),
    ]
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params[:6])
    assert all(p.kind is p.KEYWORD_ONLY for p in params[6:])
    gates = QualityGates(1.0, 4, 2, 0.5, 0.6, 0.1)
    assert (gates.min_training_improvement, gates.min_blending_epochs, gates.max_isolation_violations) == (1.0, 4, 2)
    assert (gates.min_shadowing_correlation, gates.min_probation_stability, gates.min_seed_gradient_ratio) == (
        0.5, 0.6, 0.1
    )


def assert_gate(result, gate, passed, checks_passed, checks_failed, score, message=""):
    assert isinstance(result, GateResult)
    assert (result.gate, result.passed) == (gate, passed)
    assert (result.checks_passed, result.checks_failed) == (checks_passed, checks_failed)
    assert result.score == pytest.approx(score)
    assert result.message == message


@pytest.mark.parametrize(
    "seed_id,blueprint_id,passed,ok,failed",
    [
        ("s", "b", True, ["seed_id_present", "blueprint_id_present"], []),
        ("", "b", False, ["blueprint_id_present"], ["seed_id_missing"]),
        ("s", "", False, ["seed_id_present"], ["blueprint_id_missing"]),
        ("", "", False, [], ["seed_id_missing", "blueprint_id_missing"]),
    ],
)
def test_g0(seed_id, blueprint_id, passed, ok, failed):
    result = QualityGates().check_gate(state_in(S.DORMANT, seed_id=seed_id, blueprint_id=blueprint_id), S.GERMINATED)
    message = "Germination gate" if passed else "Missing required fields"
    assert_gate(result, GateLevel.G0, passed, ok, failed, 1.0 if passed else 0.0, message)


@pytest.mark.parametrize("target", [S.UNKNOWN, S.DORMANT, S.CULLED, S.EMBARGOED, S.RESETTING], ids=lambda s: s.name)
def test_a_stage_without_a_gate_is_checked_by_g0(target):
    gates = QualityGates()
    ok = gates.check_gate(state_in(S.TRAINING), target)
    assert_gate(ok, GateLevel.G0, True, ["seed_id_present", "blueprint_id_present"], [], 1.0, "Germination gate")
    bad = gates.check_gate(state_in(S.TRAINING, seed_id=""), target)
    assert bad.gate == GateLevel.G0 and not bad.passed and bad.checks_failed == ["seed_id_missing"]


@pytest.mark.parametrize("stage", list(SeedStage), ids=lambda s: s.name)
def test_g1(stage):
    result = QualityGates().check_gate(state_in(stage), S.TRAINING)
    if stage == S.GERMINATED:
        assert_gate(result, GateLevel.G1, True, ["germinated"], [], 1.0, "Ready for training")
    else:
        assert_gate(result, GateLevel.G1, False, [], ["not_germinated"], 0.0, "Not germinated")


@pytest.mark.parametrize(
    "metrics,passed,ok,failed,score,message",
    [
        (
            dict(current_val_accuracy=41.25, accuracy_at_stage_start=40.0, isolation_violations=10,
                 epochs_in_current_stage=3, seed_gradient_norm_ratio=0.05),
            True, ["global_improvement_1.25%", "isolation_ok", "seed_ready", "seed_gradient_active_0.05"], [],
            0.25, "Improvement: 1.25%",
        ),
        (
            dict(current_val_accuracy=40.2, accuracy_at_stage_start=40.0, isolation_violations=11,
                 epochs_in_current_stage=2, seed_gradient_norm_ratio=0.01),
            False, [],
            ["global_improvement_insufficient_0.20%", "isolation_violations_11", "seed_not_ready",
             "seed_gradient_low_0.01"],
            0.04, "Improvement: 0.20%",
        ),
        (
            dict(current_val_accuracy=38.0, accuracy_at_stage_start=40.0, epochs_in_current_stage=8,
                 seed_gradient_norm_ratio=1.5),
            False, ["isolation_ok", "seed_ready", "seed_gradient_active_1.50"],
            ["global_improvement_insufficient_-2.00%"], 0.0, "Improvement: -2.00%",
        ),
        (  # everything but the gradient: a seed riding the host's improvement is held back
            dict(current_val_accuracy=52.0, accuracy_at_stage_start=40.0, epochs_in_current_stage=5),
            False, ["global_improvement_12.00%", "isolation_ok", "seed_ready"], ["seed_gradient_low_0.00"],
            1.0, "Improvement: 12.00%",
        ),
    ],
    ids=["passes", "all_fail", "regression", "no_gradient"],
)
def test_g2(metrics, passed, ok, failed, score, message):
    result = QualityGates().check_gate(state_in(S.TRAINING, **metrics), S.BLENDING)
    assert_gate(result, GateLevel.G2, passed, ok, failed, score, message)


def test_g2_with_custom_thresholds():
    gates = QualityGates(min_training_improvement=0.0, min_blending_epochs=0, min_seed_gradient_ratio=0.0)
    result = gates.check_gate(state_in(S.TRAINING), S.BLENDING)
    assert_gate(result, GateLevel.G2, True,
                ["global_improvement_0.00%", "isolation_ok", "seed_ready", "seed_gradient_active_0.00"], [],
                0.0, "Improvement: 0.00%")
    strict = QualityGates(max_isolation_violations=0, min_blending_epochs=6)
    result = strict.check_gate(state_in(S.TRAINING, isolation_violations=1, epochs_in_current_stage=5), S.BLENDING)
    assert "isolation_violations_1" in result.checks_failed and "seed_not_ready" in result.checks_failed


@pytest.mark.parametrize(
    "epochs,alpha,passed,ok,failed",
    [
        (3, 0.95, True, ["blending_complete", "alpha_high"], []),
        (7, 1.0, True, ["blending_complete", "alpha_high"], []),
        (2, 1.0, False, ["alpha_high"], ["blending_incomplete_2"]),
        (3, 0.5, False, ["blending_complete"], ["alpha_low_0.50"]),
        (0, 0.949, False, [], ["blending_incomplete_0", "alpha_low_0.95"]),
    ],
)
def test_g3(epochs, alpha, passed, ok, failed):
    result = QualityGates().check_gate(state_in(S.BLENDING, alpha=alpha, epochs_in_current_stage=epochs), S.SHADOWING)
    assert_gate(result, GateLevel.G3, passed, ok, failed, alpha)


@pytest.mark.parametrize("stage", [S.SHADOWING, S.BLENDING, S.PROBATIONARY], ids=lambda s: s.name)
def test_g4(stage):
    result = QualityGates().check_gate(state_in(stage), S.PROBATIONARY)
    if stage == S.SHADOWING:
        assert_gate(result, GateLevel.G4, True, ["shadowing_complete"], [], 1.0)
    else:
        assert_gate(result, GateLevel.G4, False, [], ["shadowing_incomplete"], 0.0)


@pytest.mark.parametrize(
    "contribution,healthy,passed,ok,failed,score",
    [
        (None, True, False, [], ["counterfactual_not_available"], 0.0),
        (None, False, False, [], ["counterfactual_not_available"], 0.0),
        (2.5, True, True, ["positive_contribution_2.50%", "healthy"], [], 0.25),
        (15.0, True, True, ["positive_contribution_15.00%", "healthy"], [], 1.0),
        (0.0, True, False, ["healthy"], ["non_positive_contribution"], 0.0),
        (-1.0, False, False, [], ["non_positive_contribution", "unhealthy"], 0.0),
        (3.0, False, False, ["positive_contribution_3.00%"], ["unhealthy"], 0.3),
    ],
)
def test_g5(contribution, healthy, passed, ok, failed, score):
    state = state_in(S.PROBATIONARY, healthy=healthy, counterfactual_contribution=contribution,
                     current_val_accuracy=90.0)  # total improvement is never a fallback
    result = QualityGates().check_gate(state, S.FOSSILIZED)
    assert_gate(result, GateLevel.G5, passed, ok, failed, score)


def test_a_gate_level_outside_g0_to_g5_passes():
    class Custom(QualityGates):
        def _get_gate_level(self, target_stage):
            return 99

    result = Custom().check_gate(state_in(S.TRAINING), S.BLENDING)
    assert (result.gate, result.passed, result.score) == (99, True, 1.0)


# ============================================================================ SeedSlot: construction


def test_seed_slot_signature():
    params = inspect.signature(SeedSlot).parameters
    assert [(n, p.default) for n, p in params.items()][:7] == [
        ("slot_id", inspect.Parameter.empty), ("channels", inspect.Parameter.empty), ("device", "cpu"),
        ("gates", None), ("on_telemetry", None), ("fast_mode", False), ("task_config", None),
    ]
    for name in ("strict_transitions", "auto_blend_ramp", "compilable"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY and params[name].default is False


def test_empty_slot():
    slot = SeedSlot("s", 8)
    assert slot.device == torch.device("cpu") and isinstance(slot.gates, QualityGates)
    assert (slot.seed, slot.state, slot.alpha_schedule, slot.isolation_monitor) == (None, None, None, None)
    assert slot.isolate_gradients is False and slot.fast_mode is False and slot.task_config is None
    assert not slot.is_active and slot.alpha == 0.0 and slot.active_seed_params == 0
    assert list(slot.get_parameters()) == [] and list(slot.parameters()) == []
    assert slot.get_state_report() is None
    assert slot._shape_probe_cache == {}
    slot.set_alpha(0.5)
    assert slot.alpha == 0.0
    assert slot.step_epoch() is None
    gates = QualityGates(min_blending_epochs=1)
    assert SeedSlot("s", 8, gates=gates, device=torch.device("cpu")).gates is gates


def test_a_slot_has_only_its_alpha_copy_as_a_buffer_and_none_in_state_dict():
    # Differs from the original (no buffers): docs/COMPAT.md #17.
    slot = SeedSlot("s", 8)
    assert [name for name, _ in slot.named_buffers()] == ["_alpha_value"]
    assert "_alpha_value" not in slot.state_dict()


def test_slot_repr_is_the_plain_module_repr():
    assert repr(SeedSlot("s", 8)) == "SeedSlot()"


# ============================================================================ germinate


def test_germinate():
    host = nn.Linear(4, 4)
    slot = SeedSlot("block2_post", 16)
    state = slot.germinate("conv_light", host_module=host)
    assert state is slot.state and slot.is_active
    assert (state.seed_id, state.blueprint_id, state.slot_id) == ("block2_post-conv_light", "conv_light", "block2_post")
    assert (state.stage, state.previous_stage) == (S.GERMINATED, S.DORMANT)
    assert [entry[0] for entry in state.stage_history] == [S.GERMINATED]
    assert slot.alpha == 0.0 and slot.isolate_gradients is False
    assert slot.seed.training and all(p.device.type == "cpu" for p in slot.seed.parameters())
    assert ids(slot.get_parameters()) == ids(slot.seed.parameters())
    assert slot.active_seed_params == sum(p.numel() for p in slot.seed.parameters()) == 16 * 16 * 9 + 32
    assert isinstance(slot.isolation_monitor, GradientIsolationMonitor)
    assert ids(slot.isolation_monitor._host_params) == ids(host.parameters())
    assert ids(slot.isolation_monitor._seed_params) == ids(slot.seed.parameters())
    sig = inspect.signature(SeedSlot.germinate).parameters
    assert [(n, p.default) for n, p in sig.items()] == [
        ("self", inspect.Parameter.empty), ("blueprint_id", inspect.Parameter.empty), ("seed_id", None),
        ("host_module", None),
    ]


def test_germinate_without_host_or_in_fast_mode_has_no_monitor():
    slot = SeedSlot("s", 8)
    slot.germinate("norm")
    assert slot.isolation_monitor is None
    fast = SeedSlot("s", 8, fast_mode=True)
    fast.germinate("norm", host_module=nn.Linear(2, 2))
    assert fast.isolation_monitor is None


def test_germinate_twice_raises():
    slot = make_slot(S.TRAINING)
    with pytest.raises(RuntimeError, match="^Slot slot already has active seed$"):
        slot.germinate("norm")
    assert slot.state.seed_id == "seed" and slot.state.stage == S.TRAINING


def test_germinate_over_a_failure_stage_is_allowed():
    slot = make_slot(S.TRAINING)
    assert slot.advance_stage(S.CULLED).passed  # the seed stays, in a failure stage
    assert slot.is_active and slot.state.stage == S.CULLED
    slot.germinate("norm", seed_id="second")
    assert (slot.state.seed_id, slot.state.stage, slot.state.blueprint_id) == ("second", S.GERMINATED, "norm")


@pytest.mark.parametrize(
    "config,name,topology,available",
    [
        (None, "lora", "cnn", CNN_NAMES),  # no task_config: a cnn slot
        (None, "mlp", "cnn", CNN_NAMES),
        (TaskConfig.for_cifar10(), "nope", "cnn", CNN_NAMES),
        (TaskConfig.for_tinystories(), "conv_light", "transformer", None),
    ],
)
def test_germinate_unknown_blueprint_is_an_assertion_error_listing_the_choices(config, name, topology, available):
    slot = SeedSlot("s", 16, task_config=config)
    if available is None:
        available = [spec.name for spec in BlueprintRegistry.list_for_topology("transformer")]
    message = f"Blueprint '{name}' not available for topology '{topology}'. Available: {available}"
    with pytest.raises(AssertionError) as info:
        slot.germinate(name)
    assert str(info.value) == message
    assert isinstance(info.value.__cause__, ValueError)
    assert slot.state is None and slot.seed is None and not slot.is_active


def test_germinate_unknown_topology():
    slot = SeedSlot("s", 8, task_config=SimpleNamespace(topology="rnn"))
    with pytest.raises(AssertionError, match="^Unknown topology 'rnn' for SeedSlot.germinate$"):
        slot.germinate("norm")


def test_germinate_rejects_a_shape_changing_seed(scratch_blueprints):
    scratch_blueprints("halver", lambda channels: nn.Conv2d(channels, channels // 2, 1))
    slot = SeedSlot("s", 8)
    with pytest.raises(AssertionError, match=r"Seed 'halver' changed shape: torch.Size\(\[1, 4, 8, 8\]\) vs "
                                             r"torch.Size\(\[1, 8, 8, 8\]\)"):
        slot.germinate("halver")
    assert slot.state is None and not slot.is_active


def test_the_shape_probe_runs_the_seed_in_eval_without_grad(scratch_blueprints):
    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append((self.training, torch.is_grad_enabled(), tuple(x.shape)))
            return x

    scratch_blueprints("spy", lambda channels: Spy())
    slot = SeedSlot("s", 6)
    slot.germinate("spy")
    assert seen == [(False, False, (1, 6, 8, 8))]
    assert slot.seed.training  # train mode restored
    slot.cull()
    slot.task_config = TaskConfig.for_tinystories()
    BlueprintRegistry.register("spy", "transformer", param_estimate=1)(lambda dim: Spy())
    try:
        slot.germinate("spy")
    finally:
        BlueprintRegistry.unregister("transformer", "spy")
    assert seen[-1] == (False, False, (2, 4, 6))


# ---------------------------------------------------------------- shape probes and the RNG


def test_first_germination_draws_the_probe_after_building_the_seed():
    torch.manual_seed(123)
    slot = SeedSlot("s", 8)
    slot.germinate("conv_light")
    after = torch.rand(4)

    torch.manual_seed(123)
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    probe = torch.randn(1, 8, 8, 8)
    assert torch.equal(slot.seed.enhance.conv.weight, conv.weight)
    device, cached = slot._shape_probe_cache["cnn"]
    assert device == torch.device("cpu") and torch.equal(cached, probe)
    assert torch.equal(after, torch.rand(4))


def test_later_germinations_reuse_the_probe_without_touching_the_rng():
    slot = SeedSlot("s", 8)
    slot.germinate("norm")  # the norm seed draws nothing itself
    probe = slot._shape_probe_cache["cnn"][1]
    slot.cull()
    rng = torch.get_rng_state()
    slot.germinate("norm")
    assert torch.equal(torch.get_rng_state(), rng)
    assert slot._shape_probe_cache["cnn"][1] is probe
    assert list(slot._shape_probe_cache) == ["cnn"]


def test_one_probe_per_topology():
    torch.manual_seed(5)
    slot = SeedSlot("s", 16)
    slot.germinate("norm")
    slot.cull()
    slot.task_config = TaskConfig.for_tinystories()
    slot.germinate("norm")  # transformer LayerNorm seed: no draw of its own either
    torch.manual_seed(5)
    cnn_probe, transformer_probe = torch.randn(1, 16, 8, 8), torch.randn(2, 4, 16)
    assert torch.equal(slot._shape_probe_cache["cnn"][1], cnn_probe)
    assert torch.equal(slot._shape_probe_cache["transformer"][1], transformer_probe)


def test_moving_the_slot_to_another_device_drops_the_probes():
    slot = SeedSlot("s", 8)
    slot.germinate("norm")
    probe = slot._shape_probe_cache["cnn"]
    slot.cull()
    assert slot.to("cpu") is slot and slot._shape_probe_cache["cnn"] is probe  # same device: kept
    slot.to(torch.float64)
    assert slot.device == torch.device("cpu") and slot._shape_probe_cache["cnn"] is probe
    slot.to("meta")
    assert slot.device == torch.device("meta") and slot._shape_probe_cache == {}
    slot.germinate("norm")
    assert slot.seed.scale.device.type == "meta"
    assert slot._shape_probe_cache["cnn"][0] == torch.device("meta")


def test_to_moves_the_seed_and_reads_the_device_from_it():
    slot = make_slot(S.TRAINING, blueprint="norm")
    slot.to("meta")
    assert slot.seed.scale.device.type == "meta" and slot.device == torch.device("meta")


def test_an_empty_slot_follows_a_device_keyword_of_to():
    # The original reads only positional arguments: docs/COMPAT.md #20.
    slot = SeedSlot("s", 8)
    slot.to(device="meta")
    assert slot.device == torch.device("meta")


# ============================================================================ advance_stage


def test_advance_stage_without_a_seed():
    result = SeedSlot("s", 8).advance_stage()
    assert_gate(result, GateLevel.G0, False, [], ["no_active_seed"], 0.0)
    assert SeedSlot("s", 8).advance_stage(S.TRAINING).checks_failed == ["no_active_seed"]


def test_advance_stage_defaults_to_the_next_non_failure_stage():
    events = []
    slot = make_slot(S.GERMINATED, on_telemetry=events.append)
    events.clear()
    result = slot.advance_stage()
    assert_gate(result, GateLevel.G1, True, ["germinated"], [], 1.0, "Ready for training")
    assert slot.state.stage == S.TRAINING and slot.isolate_gradients is True
    assert [(e.event_type, e.data) for e in events] == [
        (E.SEED_STAGE_CHANGED, {"from": "GERMINATED", "to": "TRAINING"})
    ]


def test_advance_stage_from_fossilized_has_no_valid_transition():
    slot = make_slot(S.FOSSILIZED)
    result = slot.advance_stage()
    assert_gate(result, GateLevel.G0, False, [], ["no_valid_transition"], 0.0)
    assert slot.state.stage == S.FOSSILIZED


@pytest.mark.parametrize(
    "stage,target,gate",
    [
        (S.TRAINING, S.GERMINATED, GateLevel.G0),  # G0 passes; TRAINING -> GERMINATED is illegal
        (S.TRAINING, S.DORMANT, GateLevel.G0),
        (S.BLENDING, S.FOSSILIZED, GateLevel.G5),
        (S.FOSSILIZED, S.CULLED, GateLevel.G0),
    ],
    ids=lambda v: v.name if isinstance(v, (SeedStage, GateLevel)) else None,
)
def test_an_illegal_target_whose_gate_passes_fails_the_transition(stage, target, gate):
    events = []
    slot = make_slot(stage, on_telemetry=events.append)
    slot.state.metrics.counterfactual_contribution = 5.0
    events.clear()
    result = slot.advance_stage(target)
    assert_gate(result, gate, False, [], ["transition_failed"], 0.0)
    assert slot.state.stage == stage and events == []


def test_a_failed_gate_is_returned_as_is():
    slot = make_slot(S.TRAINING)
    slot.state.metrics.record_accuracy(40.0)
    result = slot.advance_stage(S.BLENDING)
    expected = QualityGates().check_gate(slot.state, S.BLENDING)
    assert dataclasses.replace(result, timestamp=None) == dataclasses.replace(expected, timestamp=None)
    assert result.checks_failed == ["global_improvement_insufficient_0.00%", "seed_not_ready",
                                    "seed_gradient_low_0.00"]
    assert slot.state.stage == S.TRAINING


OPEN_GATES = dict(min_training_improvement=0.0, min_blending_epochs=0, min_seed_gradient_ratio=0.0)


def test_advance_to_blending_does_not_start_a_ramp():
    slot = make_slot(S.TRAINING, gates=QualityGates(**OPEN_GATES))
    slot.isolate_gradients = True
    slot.state.metrics.record_accuracy(61.5)
    assert slot.advance_stage(S.BLENDING).passed
    assert slot.state.stage == S.BLENDING and slot.isolate_gradients is False
    assert slot.state.metrics.accuracy_at_blending_start == 61.5
    assert slot.alpha_schedule is None and slot.alpha == 0.0
    assert (slot.state.blending_steps_done, slot.state.blending_steps_total) == (0, 0)


@pytest.mark.parametrize("config,steps", [(None, 5), (TaskConfig(task_type="classification", topology="cnn",
                         baseline_loss=2.3, target_loss=0.3, typical_loss_delta_std=0.05, max_epochs=10,
                         blending_steps=7), 7)])
def test_auto_blend_ramp_starts_the_ramp(config, steps):
    slot = make_slot(S.TRAINING, gates=QualityGates(**OPEN_GATES), auto_blend_ramp=True, task_config=config)
    assert slot.advance_stage(S.BLENDING).passed
    assert isinstance(slot.alpha_schedule, AlphaSchedule) and slot.alpha_schedule.total_steps == steps
    assert (slot.state.blending_steps_done, slot.state.blending_steps_total) == (0, steps)


def test_advance_stage_to_culled_keeps_the_seed():
    events = []
    slot = make_slot(S.TRAINING, on_telemetry=events.append)
    events.clear()
    result = slot.advance_stage(S.CULLED)
    assert result.gate == GateLevel.G0 and result.passed
    assert slot.state.stage == S.CULLED and slot.seed is not None and slot.is_active
    assert [(e.event_type, e.data) for e in events] == [(E.SEED_STAGE_CHANGED, {"from": "TRAINING", "to": "CULLED"})]
    x = host_input()
    assert slot(x) is x  # a failure stage takes no part in the forward pass
    assert slot.cull() is False  # CULLED -> CULLED is not a transition


def test_strict_transitions_raise_invalid_transition_error():
    slot = make_slot(S.TRAINING, strict_transitions=True)
    with pytest.raises(InvalidTransitionError, match="TRAINING -> FOSSILIZED") as info:
        slot.advance_stage(S.FOSSILIZED)
    assert isinstance(info.value, ValueError)
    assert (info.value.current, info.value.target) == (S.TRAINING, S.FOSSILIZED)
    assert slot.state.stage == S.TRAINING
    assert slot.advance_stage(S.CULLED).passed  # legal moves are unaffected


def test_fossilize_emits_the_summary():
    events = []
    slot = make_slot(S.PROBATIONARY, blueprint="conv_light", on_telemetry=events.append)
    m = slot.state.metrics
    m.record_accuracy(40.0)
    m.accuracy_at_blending_start = 41.0
    m.record_accuracy(44.5)
    m.counterfactual_contribution = 1.75
    events.clear()
    assert slot.advance_stage().passed
    assert slot.state.stage == S.FOSSILIZED
    assert [e.event_type for e in events] == [E.SEED_STAGE_CHANGED, E.SEED_FOSSILIZED]
    assert events[0].data == {"from": "PROBATIONARY", "to": "FOSSILIZED"}
    data = events[1].data
    assert list(data) == ["blueprint_id", "seed_id", "improvement", "blending_delta", "counterfactual",
                          "params_added", "epochs_total", "epochs_in_stage"]
    assert data == {
        "blueprint_id": "conv_light", "seed_id": "seed", "improvement": 4.5, "blending_delta": 3.5,
        "counterfactual": 1.75, "params_added": 8 * 8 * 9 + 16, "epochs_total": 2, "epochs_in_stage": 2,
    }
    assert all(e.seed_id == "seed" and e.slot_id == "slot" for e in events)


# ============================================================================ step_epoch


def epoch(slot, accuracy):
    slot.state.metrics.record_accuracy(accuracy)
    slot.step_epoch()


def test_step_epoch_drives_the_whole_lifecycle():
    events = []
    config = TaskConfig.for_cifar10()  # int(25 * 0.1) = 2 dwell epochs; ramp of 5 steps
    slot = SeedSlot("s", 8, task_config=config, on_telemetry=events.append)
    slot.germinate("norm")
    slot.step_epoch()
    assert slot.state.stage == S.TRAINING and slot.isolate_gradients is True

    epoch(slot, 40.0)
    assert slot.state.stage == S.TRAINING  # dwell of 2 not reached
    epoch(slot, 41.0)
    assert slot.state.stage == S.TRAINING  # G2: 2 < min_blending_epochs 3
    epoch(slot, 42.0)
    assert slot.state.stage == S.TRAINING  # G2: no seed gradient ratio
    slot.state.metrics.seed_gradient_norm_ratio = 0.1
    slot.step_epoch()
    assert slot.state.stage == S.BLENDING and slot.isolate_gradients is False
    assert slot.state.metrics.accuracy_at_blending_start == 42.0
    assert slot.alpha_schedule.total_steps == 5 and slot.alpha_schedule.temperature == 1.0
    assert (slot.state.blending_steps_done, slot.state.blending_steps_total, slot.alpha) == (0, 5, 0.0)

    alphas = []
    for acc in (43.0, 44.0, 45.0, 46.0):
        epoch(slot, acc)
        alphas.append(slot.alpha)
    assert slot.state.stage == S.BLENDING
    assert alphas == pytest.approx([1 / (1 + math.exp(-(k - 2.5))) for k in (1, 2, 3, 4)])
    assert slot.state.metrics.alpha_ramp_step == 4 and slot.state.metrics.current_alpha == alphas[-1]
    epoch(slot, 47.0)
    assert slot.alpha == 1.0 and slot.state.stage == S.SHADOWING

    epoch(slot, 47.5)
    assert slot.state.stage == S.SHADOWING  # dwell int(25 * 0.1) = 2
    epoch(slot, 48.0)
    assert slot.state.stage == S.PROBATIONARY
    for acc in (48.5, 49.0, 49.5):
        epoch(slot, acc)
    assert slot.state.stage == S.PROBATIONARY  # fossilizing is the caller's decision

    assert slot.advance_stage().checks_failed == ["counterfactual_not_available"]
    slot.state.metrics.counterfactual_contribution = 2.0
    assert slot.advance_stage().passed and slot.state.stage == S.FOSSILIZED
    slot.step_epoch()
    assert slot.state.stage == S.FOSSILIZED and slot.alpha == 1.0

    transitions = [(e.data["from"], e.data["to"]) for e in events if e.event_type == E.SEED_STAGE_CHANGED]
    assert transitions == [("GERMINATED", "TRAINING"), ("TRAINING", "BLENDING"), ("BLENDING", "SHADOWING"),
                           ("SHADOWING", "PROBATIONARY"), ("PROBATIONARY", "FOSSILIZED")]
    assert [e.event_type for e in events] == [E.SEED_GERMINATED] + [E.SEED_STAGE_CHANGED] * 5 + [E.SEED_FOSSILIZED]
    assert [entry[0] for entry in slot.state.stage_history] == [S.GERMINATED] + PATH


def test_step_epoch_without_task_config_dwells_one_epoch():
    slot = make_slot(S.TRAINING, blueprint="norm")
    slot.step_epoch()
    assert slot.state.stage == S.TRAINING  # 0 epochs in stage < 1
    slot.gates = QualityGates(**OPEN_GATES)
    epoch(slot, 10.0)
    assert slot.state.stage == S.BLENDING and slot.alpha_schedule.total_steps == 5


@pytest.mark.parametrize("max_epochs,fraction,dwell", [(25, 0.1, 2), (50, 0.1, 5), (5, 0.1, 1), (30, 0.2, 6)])
def test_training_dwell_is_max_1_int_max_epochs_times_fraction(max_epochs, fraction, dwell):
    config = TaskConfig(task_type="classification", topology="cnn", baseline_loss=2.3, target_loss=0.3,
                        typical_loss_delta_std=0.05, max_epochs=max_epochs, train_to_blend_fraction=fraction)
    slot = make_slot(S.TRAINING, blueprint="norm", task_config=config, gates=QualityGates(**OPEN_GATES))
    for i in range(dwell - 1):
        epoch(slot, 10.0)
    assert slot.state.stage == S.TRAINING
    epoch(slot, 10.0)
    assert slot.state.stage == S.BLENDING


def test_blending_waits_for_g3_with_alpha_held_at_one():
    slot = make_slot(S.TRAINING, blueprint="norm", gates=QualityGates(**OPEN_GATES))
    epoch(slot, 1.0)
    assert slot.state.stage == S.BLENDING
    slot.gates.min_blending_epochs = 8
    for _ in range(6):
        epoch(slot, 1.0)
    assert slot.state.stage == S.BLENDING and slot.alpha == 1.0
    assert slot.state.blending_steps_done == 6
    for _ in range(2):
        epoch(slot, 1.0)
    assert slot.state.stage == S.SHADOWING


def test_step_epoch_in_blending_without_a_ramp_jumps_to_full_alpha():
    slot = make_slot(S.TRAINING, blueprint="norm", gates=QualityGates(**OPEN_GATES))
    slot.advance_stage(S.BLENDING)  # no ramp: blending_steps_total == 0
    slot.step_epoch()
    assert slot.alpha == 1.0 and slot.state.blending_steps_done == 1
    assert slot.state.stage == S.SHADOWING  # G3 passes with min_blending_epochs 0


def test_shadowing_without_task_config_moves_after_one_epoch():
    slot = make_slot(S.SHADOWING, blueprint="norm")
    slot.step_epoch()
    assert slot.state.stage == S.SHADOWING
    epoch(slot, 1.0)
    assert slot.state.stage == S.PROBATIONARY


def test_a_task_config_without_blending_steps_ramps_over_five_steps():
    # The original raises AttributeError here: docs/COMPAT.md #21.
    config = SimpleNamespace(topology="cnn", max_epochs=10, train_to_blend_fraction=0.1, shadowing_fraction=0.1)
    slot = make_slot(S.TRAINING, blueprint="norm", task_config=config, gates=QualityGates(**OPEN_GATES))
    slot.state.metrics.record_accuracy(1.0)
    slot.state.metrics.seed_gradient_norm_ratio = 1.0
    slot.step_epoch()
    assert slot.state.stage == S.BLENDING and slot.state.blending_steps_total == 5


# ============================================================================ cull


@pytest.mark.parametrize("stage", LIVE_STAGES, ids=lambda s: s.name)
def test_cull(stage):
    events = []
    host = nn.Linear(2, 2)
    slot = SeedSlot("slot", 8, on_telemetry=events.append)
    slot.germinate("conv_light", seed_id="seed", host_module=host)
    for target in PATH[: PATH.index(stage) + 1] if stage in PATH else []:
        slot.state.transition(target)
    slot.start_blending(3)
    slot.set_alpha(0.4)
    slot.isolate_gradients = True
    m = slot.state.metrics
    m.record_accuracy(30.0)
    m.accuracy_at_blending_start = 31.0
    m.record_accuracy(33.0)
    m.counterfactual_contribution = -0.5
    slot.isolation_monitor.violations = 3
    events.clear()

    assert slot.cull("too slow") is True
    assert [e.event_type for e in events] == [E.SEED_STAGE_CHANGED, E.SEED_CULLED]
    assert events[0].data == {"from": stage.name, "to": "CULLED"}
    data = events[1].data
    assert list(data) == ["reason", "blueprint_id", "seed_id", "improvement", "blending_delta", "counterfactual",
                          "epochs_total", "epochs_in_stage"]
    assert data == {"reason": "too slow", "blueprint_id": "conv_light", "seed_id": "seed", "improvement": 3.0,
                    "blending_delta": 2.0, "counterfactual": -0.5, "epochs_total": 2, "epochs_in_stage": 2}
    assert all(e.seed_id == "seed" for e in events)
    assert (slot.seed, slot.state, slot.alpha_schedule) == (None, None, None)
    assert slot.isolate_gradients is False and slot.alpha == 0.0 and not slot.is_active
    assert slot.isolation_monitor.violations == 0 and slot.isolation_monitor._host_params == []
    assert list(slot.parameters()) == []


def test_cull_default_reason_and_refusals():
    events = []
    slot = make_slot(S.TRAINING, on_telemetry=events.append)
    assert slot.cull() is True and events[-1].data["reason"] == ""
    assert slot.cull() is False  # empty slot
    fossil = make_slot(S.FOSSILIZED)
    seed = fossil.seed
    assert fossil.cull("too late") is False
    assert fossil.seed is seed and fossil.state.stage == S.FOSSILIZED


# ============================================================================ alpha


@pytest.mark.parametrize("value,expected", [(-0.5, 0.0), (0.0, 0.0), (0.25, 0.25), (1.0, 1.0), (7.0, 1.0)])
def test_set_alpha_clamps(value, expected):
    slot = make_slot(S.BLENDING)
    slot.set_alpha(value)
    assert slot.alpha == expected == slot.state.alpha == slot.state.metrics.current_alpha


def test_start_blending_and_update_alpha_for_step():
    slot = make_slot(S.BLENDING)
    assert slot.update_alpha_for_step(3) == 0.0  # no ramp: the current alpha
    slot.state.blending_steps_done = 9
    slot.start_blending(10, temperature=2.0)
    assert (slot.state.blending_steps_done, slot.state.blending_steps_total) == (0, 10)
    assert (slot.alpha_schedule.total_steps, slot.alpha_schedule.start, slot.alpha_schedule.end) == (10, 0.0, 1.0)
    schedule = AlphaSchedule(10, temperature=2.0)
    for step in (0, 3, 5, 9, 10, 12):
        assert slot.update_alpha_for_step(step) == schedule(step) == slot.alpha
    assert slot.state.metrics.alpha_ramp_step == 12
    empty = SeedSlot("s", 8)
    empty.start_blending(4)
    assert empty.alpha_schedule.total_steps == 4 and empty.update_alpha_for_step(2) == 0.5 and empty.alpha == 0.0


def test_force_alpha_does_not_clamp_and_restores():
    slot = make_slot(S.BLENDING)
    slot.start_blending(4)
    slot.set_alpha(0.7)
    schedule = slot.alpha_schedule
    with slot.force_alpha(1.5):
        assert slot.alpha == 1.5 and slot.alpha_schedule is schedule
        assert slot.state.metrics.current_alpha == 0.7
    assert slot.alpha == 0.7


def test_force_alpha_restores_on_error():
    slot = make_slot(S.BLENDING)
    slot.set_alpha(0.3)
    with pytest.raises(KeyError):
        with slot.force_alpha(0.0):
            assert slot.alpha == 0.0
            raise KeyError("boom")
    assert slot.alpha == 0.3


def test_force_alpha_without_a_seed_is_a_no_op():
    slot = SeedSlot("s", 8)
    with slot.force_alpha(0.9):
        assert slot.alpha == 0.0 and slot.state is None
    assert slot.state is None


def test_force_alpha_changes_the_forward():
    slot = make_slot(S.BLENDING)
    slot.set_alpha(1.0)
    x = torch.randn(2, 8, 5, 5)
    with slot.force_alpha(0.0):
        assert torch.equal(slot(x), x)
    assert torch.equal(slot(x), slot.seed(x))


def test_culling_inside_force_alpha_is_not_an_error():
    # The original restores alpha on self.state, which a cull set to None: docs/COMPAT.md #22.
    slot = make_slot(S.BLENDING)
    with slot.force_alpha(0.0):
        slot.cull()
    assert slot.state is None and slot.alpha == 0.0


# ============================================================================ telemetry and reports


def test_germinated_event():
    events = []
    slot = SeedSlot("block2_post", 8, on_telemetry=events.append)
    slot.germinate("depthwise", seed_id="x")
    (event,) = events
    assert event.event_type is E.SEED_GERMINATED
    assert (event.seed_id, event.slot_id, event.epoch, event.message, event.severity) == (
        "x", "block2_post", None, "", "info"
    )
    assert list(event.data) == ["blueprint_id", "seed_id", "params"]
    assert event.data == {"blueprint_id": "depthwise", "seed_id": "x", "params": 8 * 9 + 8 * 8 + 16}


def test_fast_mode_and_no_callback_emit_nothing():
    quiet = []
    fast = SeedSlot("s", 8, on_telemetry=quiet.append, fast_mode=True)
    fast.germinate("norm")
    fast.step_epoch()
    fast.advance_stage(S.CULLED)
    fast.germinate("norm")
    fast.cull()
    assert quiet == []
    silent = SeedSlot("s", 8)  # no callback: nothing to call, no error
    silent.germinate("norm")
    assert silent.advance_stage().passed and silent.cull()


def test_get_state_report():
    slot = make_slot(S.BLENDING)
    slot.state.metrics.record_accuracy(50.0)
    report = slot.get_state_report()
    assert isinstance(report, SeedStateReport)
    assert (report.seed_id, report.slot_id, report.blueprint_id, report.stage) == ("seed", "slot", "conv_light",
                                                                                  S.BLENDING)
    assert report.previous_stage == S.TRAINING and report.metrics.epochs_total == 1
    assert report.metrics == slot.state.metrics.to_leyline()


# ============================================================================ checkpoints


def blended_model():
    model = MorphogeneticModel(CNNHost(base_channels=4))
    model.germinate_seed("depthwise", "s")
    slot = model.seed_slot
    slot.gates = QualityGates(**OPEN_GATES)
    slot.advance_stage(S.TRAINING)
    slot.state.metrics.record_accuracy(40.0)
    slot.state.metrics.record_accuracy(42.0)
    slot.advance_stage(S.BLENDING)
    slot.start_blending(6, temperature=0.5)
    slot.state.blending_steps_done = 2
    slot.update_alpha_for_step(2)
    slot.state.metrics.counterfactual_contribution = 0.75
    slot.state.metrics.seed_gradient_norm_ratio = 0.3
    return model


def test_checkpoint_round_trip_restores_the_lifecycle():
    model = blended_model()
    sd = model.state_dict()
    assert {"seed_slot._extra_state", "host.slots.block2_post._extra_state"} <= set(sd)
    assert sd["seed_slot._extra_state"]["seed_state"] is model.seed_state
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)

    fresh = MorphogeneticModel(CNNHost(base_channels=4))
    fresh.germinate_seed("depthwise", "other")
    fresh.load_state_dict(loaded)  # strict
    state, original = fresh.seed_state, model.seed_state
    assert (state.seed_id, state.stage, state.previous_stage) == ("s", S.BLENDING, S.TRAINING)
    assert state.metrics == original.metrics and state.alpha == original.alpha > 0.0
    assert (state.blending_steps_done, state.blending_steps_total) == (2, 6)
    assert [entry[0] for entry in state.stage_history] == [S.GERMINATED, S.TRAINING, S.BLENDING]
    schedule = fresh.seed_slot.alpha_schedule
    assert (schedule.total_steps, schedule.temperature) == (6, 0.5)
    assert schedule(4) == AlphaSchedule(6, temperature=0.5)(4)
    model.eval(), fresh.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_checkpoint_needs_the_same_blueprint_germinated():
    sd = blended_model().state_dict()
    empty = MorphogeneticModel(CNNHost(base_channels=4))
    with pytest.raises(RuntimeError, match="Unexpected key"):
        empty.load_state_dict(sd)


def test_checkpoint_with_a_seed_state_needs_weights_only_false():
    buffer = io.BytesIO()
    torch.save(blended_model().state_dict(), buffer)
    buffer.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(buffer, weights_only=True)


def test_extra_state_of_an_empty_slot():
    slot = SeedSlot("s", 8)
    assert slot.get_extra_state() == {"seed_state": None, "alpha_schedule": None}
    donor = make_slot(S.BLENDING)
    donor.start_blending(3)
    slot.set_extra_state(donor.get_extra_state())
    assert slot.state is donor.state and slot.alpha_schedule is donor.alpha_schedule
    assert not slot.is_active  # the state alone, without a seed module
    slot.set_extra_state({})
    assert slot.state is None and slot.alpha_schedule is None


# ============================================================================ GradientIsolationMonitor


def test_isolation_monitor():
    monitor = GradientIsolationMonitor()
    assert (monitor.threshold, monitor.host_grad_norm, monitor.seed_grad_norm) == (1e-6, 0.0, 0.0)
    assert monitor.violations == 0
    host, seed = nn.Linear(3, 2), nn.Linear(2, 2, bias=False)
    host.bias.requires_grad_(False)
    monitor.register(host, seed)
    assert ids(monitor._host_params) == [id(host.weight)] and ids(monitor._seed_params) == [id(seed.weight)]

    assert monitor.check_isolation() == (True, {"host_grad_norm": 0.0, "seed_grad_norm": 0.0,
                                                "seed_gradient_ratio": 0.0, "isolated": True, "violations": 0})
    seed.weight.grad = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    isolated, info = monitor.check_isolation()
    assert isolated and info["seed_grad_norm"] == pytest.approx(5.0) and info["seed_gradient_ratio"] == 0.0

    host.weight.grad = torch.full((2, 3), 1e-8)  # below the threshold: still isolated
    assert monitor.check_isolation()[0] is True and monitor.violations == 0

    host.weight.grad = torch.full((2, 3), 0.5)
    host.bias.grad = torch.ones(2)  # not registered (frozen at register time)
    isolated, info = monitor.check_isolation()
    host_norm = math.sqrt(6 * 0.25)
    assert not isolated and info["isolated"] is False and info["violations"] == 1
    assert info["host_grad_norm"] == pytest.approx(host_norm) == monitor.host_grad_norm
    assert info["seed_gradient_ratio"] == pytest.approx(5.0 / (host_norm + 1e-8))
    assert monitor.check_isolation()[1]["violations"] == 2

    monitor.reset()
    assert (monitor.violations, monitor.host_grad_norm, monitor.seed_grad_norm) == (0, 0.0, 0.0)
    assert monitor._host_params == [] and monitor._seed_params == []
    assert GradientIsolationMonitor(threshold=1.0).threshold == 1.0


# ============================================================================ forward: the fused join


def assert_is_lerp(y, expected, device):
    """Bit-exact torch.lerp on the CPU; within the dtype's tolerance elsewhere."""
    if device == "cpu":
        assert torch.equal(y, expected)
    else:
        assert_close(y, expected, what="blend")


def capture_seed_output(slot):
    """Keep the seed's output (with its gradient retained) from its next forward."""
    captured = {}

    def hook(module, args, output):
        if "out" not in captured:
            output.retain_grad()
            captured["out"] = output

    slot.seed.register_forward_hook(hook)
    return captured


def test_empty_slot_forward_returns_the_host_features():
    x = host_input()
    assert SeedSlot("s", 8)(x) is x


@pytest.mark.parametrize("stage", [S.GERMINATED, S.CULLED], ids=lambda s: s.name)
def test_an_inactive_stage_returns_the_host_features(stage):
    slot = make_slot(S.GERMINATED)
    if stage == S.CULLED:
        slot.state.transition(S.CULLED)  # a culled state still in place must not run the seed
    x = host_input()
    assert slot(x) is x


@pytest.mark.parametrize("topology", ["cnn", "transformer"])
def test_training_with_alpha_zero_is_a_bit_exact_straight_through_estimator(topology, device):
    blueprint, channels = ("conv_light", 8) if topology == "cnn" else ("mlp", 16)
    slot = make_slot(S.TRAINING, blueprint=blueprint, channels=channels, topology=topology, device=device)
    if topology == "transformer":
        nn.init.normal_(slot.seed.fc2.weight)
    slot.isolate_gradients = True
    captured = capture_seed_output(slot)
    x = host_input(topology, channels, device)
    y = slot(x)
    assert torch.equal(y, x) and y is not x
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, g)  # host path unchanged; nothing through the detached seed input
    assert torch.equal(captured["out"].grad, g)  # the seed output gets the same gradient
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in slot.seed.parameters())


def test_without_isolation_the_host_also_gets_the_seed_branch_gradient():
    slot = make_slot(S.TRAINING)
    assert slot.isolate_gradients is False  # walked by SeedState, not by the slot
    x = host_input()
    g = torch.randn(2, 8, 5, 5)
    slot(x).backward(g)
    expected = g + torch.autograd.grad(slot.seed(x), x, g)[0]
    torch.testing.assert_close(x.grad, expected)
    assert not torch.allclose(x.grad, g)


@pytest.mark.parametrize("stage", [S.BLENDING, S.SHADOWING, S.PROBATIONARY, S.FOSSILIZED], ids=lambda s: s.name)
def test_cnn_blend_is_lerp_with_the_host_path_detached(stage, device):
    slot = make_slot(stage, device=device)
    slot.set_alpha(0.3)
    slot.isolate_gradients = True  # so only the blend's host path could reach x
    x = host_input(device=device)
    y = slot(x)
    with torch.no_grad():
        assert_is_lerp(y, torch.lerp(x, slot.seed(x), 0.3), device)
    y.sum().backward()
    assert x.grad is None
    assert all(p.grad is not None for p in slot.seed.parameters())


def test_cnn_blend_without_isolation_reaches_the_host_through_the_seed_only():
    slot = make_slot(S.BLENDING)
    slot.set_alpha(0.6)
    x = host_input()
    slot(x).sum().backward()
    expected = torch.autograd.grad(slot.seed(x), x, torch.full_like(x, 0.6))[0]
    torch.testing.assert_close(x.grad, expected)


def test_training_with_nonzero_alpha_blends_with_a_detached_host():
    slot = make_slot(S.TRAINING, blueprint="lora", channels=16, topology="transformer")
    slot.set_alpha(0.5)
    slot.isolate_gradients = True
    x = host_input("transformer", 16)
    y = slot(x)
    with torch.no_grad():
        assert torch.equal(y, torch.lerp(x, slot.seed(x), 0.5))
    y.sum().backward()
    assert x.grad is None


@pytest.mark.parametrize("stage", [S.BLENDING, S.SHADOWING, S.PROBATIONARY, S.FOSSILIZED], ids=lambda s: s.name)
def test_transformer_blend_keeps_the_host_gradient(stage, device):
    slot = make_slot(stage, blueprint="lora", channels=16, topology="transformer", device=device)
    nn.init.normal_(slot.seed.up.weight)
    slot.set_alpha(0.25)
    slot.isolate_gradients = True
    captured = capture_seed_output(slot)
    x = host_input("transformer", 16, device)
    y = slot(x)
    with torch.no_grad():
        assert_is_lerp(y, torch.lerp(x, slot.seed(x), 0.25), device)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, 0.75 * g)
    torch.testing.assert_close(captured["out"].grad, 0.25 * g)


def test_channels_last_host_features_blend():
    slot = make_slot(S.BLENDING, blueprint="depthwise", channels=16)
    slot.set_alpha(0.6)
    x = torch.randn(2, 16, 6, 6).to(memory_format=torch.channels_last)
    y = slot(x)
    assert torch.equal(y, torch.lerp(x, slot.seed(x), 0.6))
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("alpha,expected", [(-0.5, "host"), (1.7, "seed")])
def test_blend_with_isolation_clamps_alpha(alpha, expected):
    host, seed = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(blend_with_isolation(host, seed, alpha), host if expected == "host" else seed)


def test_ste_forward_keeps_the_host_value_for_a_non_finite_seed_output():
    # The original gives NaN there: docs/COMPAT.md #15.
    host = torch.tensor([1.0, 2.0, 3.0])
    seed = torch.tensor([float("nan"), float("inf"), 0.5], requires_grad=True)
    assert torch.equal(ste_forward(host, seed), host)


def test_join_operators_need_equal_shapes():
    # torch.lerp would broadcast: docs/COMPAT.md #23.
    host, seed = torch.randn(2, 3), torch.randn(3)
    with pytest.raises(ValueError, match="seed has shape"):
        blend_with_isolation(host, seed, 0.5)
    with pytest.raises(ValueError, match="seed has shape"):
        ste_forward(host, seed)


def test_blend_with_mismatched_dtypes_is_a_value_error():
    # torch.lerp raises RuntimeError: docs/COMPAT.md #23.
    with pytest.raises(ValueError, match="dtype"):
        blend_with_isolation(torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64), 0.5)


# ============================================================================ torch.compile


def test_forward_is_fenced_off_from_torch_compile_by_default():
    assert SeedSlot.forward._torchdynamo_disable is True
    slot = make_slot(S.TRAINING, blueprint="norm")
    assert slot.compilable is False and slot.forward._torchdynamo_disable is True
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(slot, fullgraph=True, backend="aot_eager")(host_input())


def test_compilable_toggles_the_fence():
    slot = SeedSlot("s", 8, compilable=True)
    assert slot.compilable and not getattr(slot.forward, "_torchdynamo_disable", False)
    slot.compilable = False
    assert slot.forward._torchdynamo_disable is True


def test_compiled_slot_in_training_is_a_straight_through_estimator():
    slot = make_slot(S.TRAINING, blueprint="norm")
    slot.compilable = True
    slot.isolate_gradients = True
    torch._dynamo.reset()
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
    slot.compilable = True
    with torch.no_grad():
        slot.seed.scale.fill_(0.5)
    torch._dynamo.reset()
    compiled = torch.compile(slot, fullgraph=True, backend="aot_eager")
    x = host_input()
    for alpha in (0.2, 0.8):
        slot.set_alpha(alpha)
        x.grad = None
        y = compiled(x)
        torch.testing.assert_close(y, torch.lerp(x, slot.seed(x), alpha))
        y.sum().backward()
        # isolation is off in BLENDING: the host gets gradient only through the seed branch
        expected = torch.autograd.grad(slot.seed(x), x, torch.full_like(x, alpha))[0]
        torch.testing.assert_close(x.grad, expected)


def test_compiled_slot_follows_the_alpha_ramp_without_recompiling():
    from torch._dynamo.utils import counters

    slot = make_slot(S.BLENDING, blueprint="norm", compilable=True)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(slot, fullgraph=True, backend="aot_eager")
    x = host_input()
    for alpha in (0.1, 0.3, 0.5, 0.7, 0.9, 1.0):
        slot.set_alpha(alpha)
        torch.testing.assert_close(compiled(x), slot(x))
    with slot.force_alpha(0.0):
        torch.testing.assert_close(compiled(x), x)
    torch.testing.assert_close(compiled(x), slot(x))  # alpha 1.0 back after force_alpha
    assert counters["stats"]["unique_graphs"] == 1
