"""esper_fast.leyline: the data contracts, stated as the values, layouts and defaults the
original esper-lite leyline (0.2.0) has."""

import dataclasses
import math
import uuid
from datetime import datetime, timezone

import pytest

import esper_fast.leyline as leyline
from esper_fast.kasmina import BlueprintRegistry
from esper_fast.kasmina.blueprints import transformer as transformer_blueprints
from esper_fast.leyline import (
    DEFAULT_BUDGETS,
    OPERATION_TARGET_STAGE,
    TENSOR_SCHEMA_SIZE,
    VALID_TRANSITIONS,
    Action,
    AdaptationCommand,
    BlueprintProtocol,
    BlueprintSpec,
    CommandType,
    FastTrainingSignals,
    FieldReport,
    GateLevel,
    GateResult,
    PerformanceBudgets,
    RiskLevel,
    SeedMetrics,
    SeedOperation,
    SeedStage,
    SeedStateReport,
    SeedTelemetry,
    SimicAction,
    TelemetryEvent,
    TelemetryEventType,
    TensorSchema,
    TrainingMetrics,
    TrainingSignals,
    build_action_enum,
    get_blueprint_from_action,
    is_active_stage,
    is_failure_stage,
    is_germinate_action,
    is_terminal_stage,
    is_valid_transition,
)
from esper_fast.leyline import actions as leyline_actions

S = SeedStage
HAS_FLEX = transformer_blueprints._HAS_FLEX_ATTENTION


def field_defaults(cls):
    """{name: default} of a dataclass, in declaration order (factories called once)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = dataclasses.MISSING
    return out


# ============================================================================ version, constants, names


def test_version_and_lifecycle_constants():
    assert leyline.LEYLINE_VERSION == "0.2.0"
    assert (
        leyline.MIN_CULL_AGE,
        leyline.FULL_EVALUATION_AGE,
        leyline.MIN_PROBATION_EPOCHS,
        leyline.MIN_GERMINATE_EPOCH,
        leyline.MIN_PLATEAU_TO_GERMINATE,
    ) == (10, 10, 5, 5, 3)


def test_public_names_are_the_originals():
    original = {
        "LEYLINE_VERSION", "MIN_CULL_AGE", "FULL_EVALUATION_AGE", "MIN_PROBATION_EPOCHS",
        "MIN_GERMINATE_EPOCH", "MIN_PLATEAU_TO_GERMINATE", "Action", "SimicAction", "build_action_enum",
        "get_blueprint_from_action", "is_germinate_action", "SeedStage", "CommandType", "RiskLevel",
        "VALID_TRANSITIONS", "is_valid_transition", "is_terminal_stage", "is_active_stage",
        "is_failure_stage", "TensorSchema", "TENSOR_SCHEMA_SIZE", "FastTrainingSignals", "TrainingMetrics",
        "TrainingSignals", "SeedOperation", "OPERATION_TARGET_STAGE", "AdaptationCommand", "GateLevel",
        "GateResult", "BlueprintProtocol", "BlueprintSpec", "SeedMetrics", "SeedStateReport", "FieldReport",
        "TelemetryEventType", "TelemetryEvent", "PerformanceBudgets", "DEFAULT_BUDGETS", "SeedTelemetry",
    }
    assert set(leyline.__all__) == original
    assert all(hasattr(leyline, name) for name in original)


# ============================================================================ stages


STAGE_VALUES = [
    ("UNKNOWN", 0), ("DORMANT", 1), ("GERMINATED", 2), ("TRAINING", 3), ("BLENDING", 4), ("SHADOWING", 5),
    ("PROBATIONARY", 6), ("FOSSILIZED", 7), ("CULLED", 8), ("EMBARGOED", 9), ("RESETTING", 10),
]

TRANSITIONS = {
    S.UNKNOWN: (S.DORMANT,),
    S.DORMANT: (S.GERMINATED,),
    S.GERMINATED: (S.TRAINING, S.CULLED),
    S.TRAINING: (S.BLENDING, S.CULLED),
    S.BLENDING: (S.SHADOWING, S.CULLED),
    S.SHADOWING: (S.PROBATIONARY, S.CULLED),
    S.PROBATIONARY: (S.FOSSILIZED, S.CULLED),
    S.FOSSILIZED: (),
    S.CULLED: (S.EMBARGOED,),
    S.EMBARGOED: (S.RESETTING,),
    S.RESETTING: (S.DORMANT,),
}


def test_seed_stage_members_and_values():
    assert [(s.name, s.value) for s in SeedStage] == STAGE_VALUES
    assert SeedStage.BLENDING == 4  # an IntEnum


def test_valid_transitions_table_exactly():
    assert VALID_TRANSITIONS == TRANSITIONS
    assert list(VALID_TRANSITIONS) == list(SeedStage)  # one entry per stage, in stage order


@pytest.mark.parametrize("current", list(SeedStage), ids=lambda s: s.name)
def test_is_valid_transition_follows_the_table(current):
    for target in SeedStage:
        assert is_valid_transition(current, target) is (target in TRANSITIONS[current])


@pytest.mark.parametrize(
    "stage,terminal,active,failure",
    [
        (S.UNKNOWN, False, False, False),
        (S.DORMANT, False, False, False),
        (S.GERMINATED, False, False, False),
        (S.TRAINING, False, True, False),
        (S.BLENDING, False, True, False),
        (S.SHADOWING, False, True, False),
        (S.PROBATIONARY, False, True, False),
        (S.FOSSILIZED, True, True, False),
        (S.CULLED, False, False, True),
        (S.EMBARGOED, False, False, True),
        (S.RESETTING, False, False, True),
    ],
    ids=lambda v: v.name if isinstance(v, SeedStage) else None,
)
def test_stage_predicates(stage, terminal, active, failure):
    assert is_terminal_stage(stage) is terminal
    assert is_active_stage(stage) is active
    assert is_failure_stage(stage) is failure


def test_command_type_and_risk_level():
    assert [(c.name, c.value) for c in CommandType] == [
        ("GERMINATE", 1), ("ADVANCE_STAGE", 2), ("CULL", 3), ("SET_ALPHA", 4),
        ("SET_LEARNING_RATE", 5), ("PAUSE_SEED", 6), ("RESUME_SEED", 7), ("REQUEST_STATE", 8),
    ]
    assert not issubclass(CommandType, int)  # a plain Enum
    assert [(r.name, int(r)) for r in RiskLevel] == [
        ("GREEN", 1), ("YELLOW", 2), ("ORANGE", 3), ("RED", 4), ("CRITICAL", 5)
    ]
    assert RiskLevel.RED > RiskLevel.GREEN


# ============================================================================ schemas


def test_adaptation_command_defaults():
    cmd = AdaptationCommand()
    assert [f.name for f in dataclasses.fields(AdaptationCommand)] == [
        "command_id", "timestamp", "command_type", "target_seed_id", "target_slot_id", "blueprint_id",
        "target_stage", "alpha_value", "learning_rate", "reason", "confidence", "risk_level", "annotations",
    ]
    assert cmd.command_type is CommandType.GERMINATE
    assert (cmd.target_seed_id, cmd.target_slot_id, cmd.blueprint_id) == (None, None, None)
    assert (cmd.target_stage, cmd.alpha_value, cmd.learning_rate) == (None, None, None)
    assert (cmd.reason, cmd.confidence, cmd.risk_level, cmd.annotations) == ("", 1.0, RiskLevel.GREEN, {})
    assert uuid.UUID(cmd.command_id).version == 4 and str(uuid.UUID(cmd.command_id)) == cmd.command_id
    assert cmd.timestamp.tzinfo is timezone.utc
    assert abs((datetime.now(timezone.utc) - cmd.timestamp).total_seconds()) < 60


def test_adaptation_command_is_frozen_with_unique_ids():
    a, b = AdaptationCommand(), AdaptationCommand()
    assert a.command_id != b.command_id
    assert a.annotations is not b.annotations
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.reason = "changed"
    c = AdaptationCommand(command_type=CommandType.CULL, target_stage=S.CULLED, risk_level=RiskLevel.RED)
    assert (c.command_type, c.target_stage, c.risk_level) == (CommandType.CULL, S.CULLED, RiskLevel.RED)


def test_gate_level_values():
    assert [(g.name, int(g)) for g in GateLevel] == [(f"G{i}", i) for i in range(6)]


def test_gate_result_fields_and_defaults():
    assert [f.name for f in dataclasses.fields(GateResult)] == [
        "gate", "passed", "score", "checks_passed", "checks_failed", "message", "timestamp",
    ]
    result = GateResult(gate=GateLevel.G2, passed=True)
    assert (result.score, result.checks_passed, result.checks_failed, result.message) == (0.0, [], [], "")
    assert result.timestamp.tzinfo is timezone.utc
    assert GateResult(GateLevel.G0, False).checks_failed is not result.checks_failed
    with pytest.raises(TypeError):
        GateResult(gate=GateLevel.G0)  # passed is required


def test_seed_operations_and_their_target_stages():
    assert [op.name for op in SeedOperation] == [
        "GERMINATE", "START_TRAINING", "START_BLENDING", "START_SHADOWING", "START_PROBATION",
        "FOSSILIZE", "CULL", "EMBARGO", "RESET",
    ]
    assert OPERATION_TARGET_STAGE == {
        SeedOperation.GERMINATE: S.GERMINATED,
        SeedOperation.START_TRAINING: S.TRAINING,
        SeedOperation.START_BLENDING: S.BLENDING,
        SeedOperation.START_SHADOWING: S.SHADOWING,
        SeedOperation.START_PROBATION: S.PROBATIONARY,
        SeedOperation.FOSSILIZE: S.FOSSILIZED,
        SeedOperation.CULL: S.CULLED,
        SeedOperation.EMBARGO: S.EMBARGOED,
        SeedOperation.RESET: S.RESETTING,
    }


def test_blueprint_spec_contract_defaults():
    spec = BlueprintSpec(blueprint_id="b", name="n")
    assert field_defaults(BlueprintSpec) == {
        "blueprint_id": dataclasses.MISSING, "name": dataclasses.MISSING, "description": "",
        "min_channels": 1, "max_channels": None, "parameter_count_estimate": 0, "compute_cost": 1.0,
        "memory_cost": 1.0, "recommended_training_epochs": 5, "recommended_blending_epochs": 5, "tags": (),
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "m"


def test_blueprint_protocol_is_runtime_checkable():
    class Good:
        blueprint_id = "x"
        required_channels = None

        def create_module(self, in_channels, **kwargs):
            return None

    class Bad:
        blueprint_id = "x"

    assert isinstance(Good(), BlueprintProtocol)
    assert not isinstance(Bad(), BlueprintProtocol)


# ============================================================================ signals


TENSOR_SCHEMA = [
    "EPOCH", "GLOBAL_STEP", "TRAIN_LOSS", "VAL_LOSS", "LOSS_DELTA", "TRAIN_ACCURACY", "VAL_ACCURACY",
    "ACCURACY_DELTA", "PLATEAU_EPOCHS", "BEST_VAL_ACCURACY", "BEST_VAL_LOSS",
    "LOSS_HIST_0", "LOSS_HIST_1", "LOSS_HIST_2", "LOSS_HIST_3", "LOSS_HIST_4",
    "ACC_HIST_0", "ACC_HIST_1", "ACC_HIST_2", "ACC_HIST_3", "ACC_HIST_4",
    "HAS_ACTIVE_SEED", "SEED_STAGE", "SEED_EPOCHS_IN_STAGE", "SEED_ALPHA", "SEED_IMPROVEMENT",
    "AVAILABLE_SLOTS", "SEED_COUNTERFACTUAL", "HOST_GRAD_NORM", "HOST_LEARNING_PHASE",
    "BLUEPRINT_0", "BLUEPRINT_1", "BLUEPRINT_2", "BLUEPRINT_3", "BLUEPRINT_4",
]

FAST_FIELDS = [
    "epoch", "global_step", "train_loss", "val_loss", "loss_delta", "train_accuracy", "val_accuracy",
    "accuracy_delta", "plateau_epochs", "best_val_accuracy", "best_val_loss", "loss_history_5",
    "accuracy_history_5", "has_active_seed", "seed_stage", "seed_epochs_in_stage", "seed_alpha",
    "seed_improvement", "available_slots", "seed_counterfactual", "host_grad_norm", "host_learning_phase",
]


def test_tensor_schema_indices():
    assert [(m.name, int(m)) for m in TensorSchema] == [(name, i) for i, name in enumerate(TENSOR_SCHEMA)]
    assert TENSOR_SCHEMA_SIZE == 35 == len(TensorSchema)


def sample_signals(**changes):
    values = dict(
        epoch=7, global_step=700, train_loss=1.5, val_loss=1.75, loss_delta=0.25, train_accuracy=55.0,
        val_accuracy=52.5, accuracy_delta=1.25, plateau_epochs=2, best_val_accuracy=53.0, best_val_loss=1.7,
        loss_history_5=(2.0, 1.9, 1.8, 1.7, 1.6), accuracy_history_5=(40.0, 45.0, 48.0, 50.0, 52.5),
        has_active_seed=1, seed_stage=4, seed_epochs_in_stage=3, seed_alpha=0.375, seed_improvement=0.5,
        available_slots=0, seed_counterfactual=2.5, host_grad_norm=4.0, host_learning_phase=0.125,
    )
    values.update(changes)
    return FastTrainingSignals(**values)


def test_fast_training_signals_fields():
    assert list(FastTrainingSignals._fields) == FAST_FIELDS


def test_to_vector_layout_matches_the_tensor_schema():
    s = sample_signals()
    v = s.to_vector()
    assert len(v) == 30 and all(isinstance(x, float) for x in v)
    expected = {
        TensorSchema.EPOCH: 7.0, TensorSchema.GLOBAL_STEP: 700.0, TensorSchema.TRAIN_LOSS: 1.5,
        TensorSchema.VAL_LOSS: 1.75, TensorSchema.LOSS_DELTA: 0.25, TensorSchema.TRAIN_ACCURACY: 55.0,
        TensorSchema.VAL_ACCURACY: 52.5, TensorSchema.ACCURACY_DELTA: 1.25, TensorSchema.PLATEAU_EPOCHS: 2.0,
        TensorSchema.BEST_VAL_ACCURACY: 53.0, TensorSchema.BEST_VAL_LOSS: 1.7,
        TensorSchema.LOSS_HIST_0: 2.0, TensorSchema.LOSS_HIST_4: 1.6,
        TensorSchema.ACC_HIST_0: 40.0, TensorSchema.ACC_HIST_4: 52.5,
        TensorSchema.HAS_ACTIVE_SEED: 1.0, TensorSchema.SEED_STAGE: 4.0, TensorSchema.SEED_EPOCHS_IN_STAGE: 3.0,
        TensorSchema.SEED_ALPHA: 0.375, TensorSchema.SEED_IMPROVEMENT: 0.5, TensorSchema.AVAILABLE_SLOTS: 0.0,
        TensorSchema.SEED_COUNTERFACTUAL: 0.25,  # counterfactual / 10
        TensorSchema.HOST_GRAD_NORM: 0.4,  # min(norm, 10) / 10
        TensorSchema.HOST_LEARNING_PHASE: 0.125,
    }
    for index, value in expected.items():
        assert v[index] == pytest.approx(value, abs=1e-12), index.name
    assert v[TensorSchema.LOSS_HIST_0 : TensorSchema.LOSS_HIST_4 + 1] == [2.0, 1.9, 1.8, 1.7, 1.6]
    assert v[TensorSchema.ACC_HIST_0 : TensorSchema.ACC_HIST_4 + 1] == [40.0, 45.0, 48.0, 50.0, 52.5]


@pytest.mark.parametrize("norm,feature", [(0.0, 0.0), (5.0, 0.5), (10.0, 1.0), (250.0, 1.0)])
def test_to_vector_clamps_the_host_gradient_norm(norm, feature):
    assert sample_signals(host_grad_norm=norm).to_vector()[TensorSchema.HOST_GRAD_NORM] == feature


@pytest.mark.parametrize("counterfactual,feature", [(-30.0, -3.0), (0.0, 0.0), (7.5, 0.75)])
def test_to_vector_scales_the_counterfactual_without_clamping(counterfactual, feature):
    v = sample_signals(seed_counterfactual=counterfactual).to_vector()
    assert v[TensorSchema.SEED_COUNTERFACTUAL] == pytest.approx(feature)


def test_fast_training_signals_empty():
    e = FastTrainingSignals.empty()
    assert e == FastTrainingSignals(
        epoch=0, global_step=0, train_loss=0.0, val_loss=0.0, loss_delta=0.0, train_accuracy=0.0,
        val_accuracy=0.0, accuracy_delta=0.0, plateau_epochs=0, best_val_accuracy=0.0,
        best_val_loss=math.inf, loss_history_5=(0.0,) * 5, accuracy_history_5=(0.0,) * 5,
        has_active_seed=0, seed_stage=0, seed_epochs_in_stage=0, seed_alpha=0.0, seed_improvement=0.0,
        available_slots=1, seed_counterfactual=0.0, host_grad_norm=0.0, host_learning_phase=0.0,
    )
    v = e.to_vector()
    assert v[TensorSchema.BEST_VAL_LOSS] == math.inf and v[TensorSchema.AVAILABLE_SLOTS] == 1.0


def test_training_metrics_defaults():
    assert field_defaults(TrainingMetrics) == {
        "epoch": 0, "global_step": 0, "train_loss": 0.0, "val_loss": 0.0, "loss_delta": 0.0,
        "train_accuracy": 0.0, "val_accuracy": 0.0, "accuracy_delta": 0.0, "plateau_epochs": 0,
        "host_stabilized": 0, "best_val_accuracy": 0.0, "best_val_loss": math.inf,
        "grad_norm_host": 0.0, "grad_norm_seed": 0.0,
    }
    assert hasattr(TrainingMetrics, "__slots__")
    with pytest.raises(AttributeError):
        TrainingMetrics().not_a_field = 1


def test_training_signals_defaults():
    s = TrainingSignals()
    assert [f.name for f in dataclasses.fields(TrainingSignals)] == [
        "metrics", "active_seeds", "available_slots", "seed_stage", "seed_epochs_in_stage", "seed_alpha",
        "seed_improvement", "seed_counterfactual", "gpu_memory_used", "gpu_utilization", "loss_history",
        "accuracy_history", "epoch_duration_ms", "timestamp",
    ]
    assert s.metrics == TrainingMetrics() and s.active_seeds == [] and s.available_slots == 0
    assert s.timestamp.tzinfo is timezone.utc


@pytest.mark.parametrize(
    "history,padded",
    [
        ([], (0.0, 0.0, 0.0, 0.0, 0.0)),
        ([3.0], (0.0, 0.0, 0.0, 0.0, 3.0)),
        ([1.0, 2.0], (0.0, 0.0, 0.0, 1.0, 2.0)),
        ([1.0, 2.0, 3.0, 4.0, 5.0], (1.0, 2.0, 3.0, 4.0, 5.0)),
        ([9.0, 8.0, 1.0, 2.0, 3.0, 4.0, 5.0], (1.0, 2.0, 3.0, 4.0, 5.0)),
    ],
)
def test_to_fast_pads_history_on_the_left_to_five(history, padded):
    signals = TrainingSignals(loss_history=list(history), accuracy_history=[10 * h for h in history])
    fast = signals.to_fast()
    assert fast.loss_history_5 == padded
    assert fast.accuracy_history_5 == tuple(10 * h for h in padded)
    assert isinstance(fast.loss_history_5, tuple)
    assert signals.loss_history == history  # not modified


def test_to_fast_copies_the_metrics_and_caps_best_loss():
    metrics = TrainingMetrics(
        epoch=20, global_step=2000, train_loss=0.9, val_loss=1.1, loss_delta=0.05, train_accuracy=70.0,
        val_accuracy=68.0, accuracy_delta=0.5, plateau_epochs=1, best_val_accuracy=69.0,
        grad_norm_host=3.5,
    )
    signals = TrainingSignals(
        metrics=metrics, active_seeds=["a"], available_slots=2, seed_stage=3, seed_epochs_in_stage=4,
        seed_alpha=0.2, seed_improvement=1.5, seed_counterfactual=0.7,
    )
    fast = signals.to_fast()
    assert fast.best_val_loss == 10.0  # inf capped
    assert (fast.epoch, fast.global_step, fast.train_loss, fast.val_loss, fast.loss_delta) == (20, 2000, 0.9, 1.1, 0.05)
    assert (fast.train_accuracy, fast.val_accuracy, fast.accuracy_delta) == (70.0, 68.0, 0.5)
    assert (fast.plateau_epochs, fast.best_val_accuracy) == (1, 69.0)
    assert (fast.has_active_seed, fast.available_slots) == (1, 2)
    assert (fast.seed_stage, fast.seed_epochs_in_stage, fast.seed_alpha) == (3, 4, 0.2)
    assert (fast.seed_improvement, fast.seed_counterfactual) == (1.5, 0.7)
    assert fast.host_grad_norm == 3.5
    assert fast.host_learning_phase == 20 / 200  # max_epochs defaults to 200

    metrics.best_val_loss = 2.5
    assert signals.to_fast().best_val_loss == 2.5
    assert TrainingSignals().to_fast().has_active_seed == 0


def test_to_fast_overrides_and_learning_phase():
    signals = TrainingSignals(
        metrics=TrainingMetrics(epoch=6), seed_stage=3, seed_epochs_in_stage=4, seed_alpha=0.2,
        seed_improvement=1.5, seed_counterfactual=0.7,
    )
    fast = signals.to_fast(
        seed_stage=5, seed_epochs_in_stage=0, seed_alpha=0.0, seed_improvement=-2.0,
        seed_counterfactual=0.0, max_epochs=12,
    )
    # an override of 0 still wins (only None means "use the record's value")
    assert (fast.seed_stage, fast.seed_epochs_in_stage, fast.seed_alpha) == (5, 0, 0.0)
    assert (fast.seed_improvement, fast.seed_counterfactual) == (-2.0, 0.0)
    assert fast.host_learning_phase == 0.5
    assert signals.to_fast(max_epochs=0).host_learning_phase == 6.0  # max(1, max_epochs)


# ============================================================================ reports


def test_leyline_seed_metrics_defaults():
    assert field_defaults(SeedMetrics) == {
        "epochs_total": 0, "epochs_in_current_stage": 0, "initial_val_accuracy": 0.0,
        "current_val_accuracy": 0.0, "best_val_accuracy": 0.0, "accuracy_at_stage_start": 0.0,
        "total_improvement": 0.0, "improvement_since_stage_start": 0.0, "isolation_violations": 0,
        "gradient_norm_avg": 0.0, "current_alpha": 0.0, "alpha_ramp_step": 0,
    }
    assert hasattr(SeedMetrics, "__slots__")


def test_seed_state_report_defaults():
    r = SeedStateReport()
    assert [f.name for f in dataclasses.fields(SeedStateReport)] == [
        "seed_id", "slot_id", "blueprint_id", "stage", "previous_stage", "previous_epochs_in_stage",
        "stage_entered_at", "metrics", "is_healthy", "is_improving", "needs_attention", "annotations",
        "reported_at",
    ]
    assert (r.seed_id, r.slot_id, r.blueprint_id) == ("", "", "")
    assert (r.stage, r.previous_stage, r.previous_epochs_in_stage) == (S.UNKNOWN, S.UNKNOWN, 0)
    assert r.metrics == SeedMetrics()
    assert (r.is_healthy, r.is_improving, r.needs_attention, r.annotations) == (True, False, False, {})
    assert r.stage_entered_at.tzinfo is timezone.utc and r.reported_at.tzinfo is timezone.utc


def test_field_report_defaults():
    r = FieldReport()
    assert [f.name for f in dataclasses.fields(FieldReport)] == [
        "report_id", "seed_id", "blueprint_id", "slot_id", "final_stage", "success", "germinated_at",
        "completed_at", "total_epochs", "epochs_per_stage", "accuracy_at_germination",
        "accuracy_at_completion", "total_improvement", "best_accuracy_achieved", "signals_at_germination",
        "commands_received", "failure_reason", "failure_stage",
    ]
    assert uuid.UUID(r.report_id).version == 4 and FieldReport().report_id != r.report_id
    assert (r.final_stage, r.success, r.total_epochs, r.epochs_per_stage) == (S.UNKNOWN, False, 0, {})
    assert (r.accuracy_at_germination, r.accuracy_at_completion) == (0.0, 0.0)
    assert (r.total_improvement, r.best_accuracy_achieved) == (0.0, 0.0)
    assert (r.signals_at_germination, r.commands_received) == (None, [])
    assert (r.failure_reason, r.failure_stage) == ("", S.UNKNOWN)


# ============================================================================ telemetry


TELEMETRY_TYPES = [
    "SEED_GERMINATED", "SEED_STAGE_CHANGED", "SEED_FOSSILIZED", "SEED_CULLED",
    "EPOCH_COMPLETED", "PLATEAU_DETECTED", "DEGRADATION_DETECTED", "IMPROVEMENT_DETECTED", "TAMIYO_INITIATED",
    "ISOLATION_VIOLATION", "GRADIENT_ANOMALY", "PERFORMANCE_DEGRADATION",
    "COMMAND_ISSUED", "COMMAND_EXECUTED", "COMMAND_FAILED",
    "PPO_UPDATE_COMPLETED", "MEMORY_WARNING", "REWARD_HACKING_SUSPECTED", "REWARD_COMPUTED",
    "RATIO_EXPLOSION_DETECTED", "RATIO_COLLAPSE_DETECTED", "VALUE_COLLAPSE_DETECTED",
    "GRADIENT_PATHOLOGY_DETECTED", "NUMERICAL_INSTABILITY_DETECTED",
]


def test_telemetry_event_types_in_order():
    assert [(t.name, t.value) for t in TelemetryEventType] == [
        (name, i) for i, name in enumerate(TELEMETRY_TYPES, start=1)
    ]


def test_telemetry_event_defaults():
    e = TelemetryEvent()
    assert [f.name for f in dataclasses.fields(TelemetryEvent)] == [
        "event_id", "event_type", "timestamp", "seed_id", "slot_id", "epoch", "message", "data", "severity",
    ]
    assert e.event_type is TelemetryEventType.EPOCH_COMPLETED
    assert (e.seed_id, e.slot_id, e.epoch, e.message, e.data, e.severity) == (None, None, None, "", {}, "info")
    assert uuid.UUID(e.event_id).version == 4 and TelemetryEvent().event_id != e.event_id
    assert e.timestamp.tzinfo is timezone.utc


def test_performance_budgets():
    assert field_defaults(PerformanceBudgets) == {
        "epoch_budget_ms": 18.0, "blending_budget_ms": 5.0, "gate_check_budget_ms": 2.0,
        "seed_memory_budget_gb": 2.0, "total_memory_budget_gb": 12.0, "max_message_size_bytes": 280,
        "serialization_budget_us": 80.0,
    }
    assert DEFAULT_BUDGETS == PerformanceBudgets()
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_BUDGETS.epoch_budget_ms = 1.0


def test_seed_telemetry_defaults():
    t = SeedTelemetry(seed_id="s")
    defaults = field_defaults(SeedTelemetry)
    defaults.pop("captured_at")
    assert defaults == {
        "seed_id": dataclasses.MISSING, "blueprint_id": "", "layer_id": "", "gradient_norm": 0.0,
        "gradient_health": 1.0, "has_vanishing": False, "has_exploding": False, "accuracy": 0.0,
        "accuracy_delta": 0.0, "epochs_in_stage": 0, "stage": 1, "alpha": 0.0, "epoch": 0, "max_epochs": 25,
    }
    assert t.captured_at.tzinfo is timezone.utc
    assert hasattr(SeedTelemetry, "__slots__")
    assert SeedTelemetry.feature_dim() == 10 == len(t.to_features())
    assert t.to_features() == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "changes,features",
    [
        (
            dict(gradient_norm=2.5, gradient_health=0.8, has_vanishing=True, has_exploding=False,
                 epochs_in_stage=10, accuracy=62.0, accuracy_delta=2.5, stage=4, alpha=0.6, epoch=5, max_epochs=20),
            [0.25, 0.8, 1.0, 0.0, 0.2, 0.62, 0.25, 0.5, 0.6, 0.25],
        ),
        (  # every clamp: norm at 10, epochs at 50, delta to [-1, 1], stage above FOSSILIZED to 1
            dict(gradient_norm=99.0, has_exploding=True, epochs_in_stage=80, accuracy=100.0,
                 accuracy_delta=-35.0, stage=10, alpha=1.0, epoch=3, max_epochs=0),
            [1.0, 1.0, 0.0, 1.0, 1.0, 1.0, -1.0, 1.0, 1.0, 3.0],
        ),
        (dict(accuracy_delta=40.0, stage=7), [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]),
    ],
)
def test_seed_telemetry_to_features(changes, features):
    t = SeedTelemetry(seed_id="s", **changes)
    assert t.to_features() == pytest.approx(features)


# ============================================================================ actions


def cnn_members():
    return [
        ("WAIT", 0), ("GERMINATE_NORM", 1), ("GERMINATE_ATTENTION", 2), ("GERMINATE_DEPTHWISE", 3),
        ("GERMINATE_CONV_LIGHT", 4), ("GERMINATE_CONV_HEAVY", 5), ("FOSSILIZE", 6), ("CULL", 7),
    ]


def transformer_members():
    names = ["NORM", "LORA", "ATTENTION"] + (["FLEX_ATTENTION"] if HAS_FLEX else []) + ["MLP"]
    members = [("WAIT", 0)] + [(f"GERMINATE_{n}", i) for i, n in enumerate(names, start=1)]
    return members + [("FOSSILIZE", len(names) + 1), ("CULL", len(names) + 2)]


@pytest.mark.parametrize(
    "topology,enum_name,members",
    [("cnn", "CnnAction", cnn_members()), ("transformer", "TransformerAction", transformer_members())],
)
def test_build_action_enum_layout(topology, enum_name, members):
    enum = build_action_enum(topology)
    assert enum.__name__ == enum_name
    assert [(m.name, m.value) for m in enum] == members
    assert all(isinstance(m, int) for m in enum)


@pytest.mark.skipif(not HAS_FLEX, reason="torch without FlexAttention")
def test_transformer_actions_include_flex_attention():
    enum = build_action_enum("transformer")
    assert enum.GERMINATE_FLEX_ATTENTION == 4 and enum.GERMINATE_MLP == 5 and enum.CULL == 7


def test_build_action_enum_is_cached():
    assert build_action_enum("cnn") is build_action_enum("cnn")
    assert leyline_actions._action_enum_cache["cnn"] is build_action_enum("cnn")


def test_unknown_topology_has_only_the_fixed_actions():
    try:
        enum = build_action_enum("nothing_registered")
        assert enum.__name__ == "Nothing_RegisteredAction"
        assert [(m.name, m.value) for m in enum] == [("WAIT", 0), ("FOSSILIZE", 1), ("CULL", 2)]
    finally:
        leyline_actions._action_enum_cache.pop("nothing_registered", None)


def test_register_and_unregister_invalidate_the_cached_enum():
    before = build_action_enum("cnn")
    other = build_action_enum("transformer")
    try:
        BlueprintRegistry.register("tiny_test", "cnn", param_estimate=150)(lambda channels: None)
        grown = build_action_enum("cnn")
        assert grown is not before
        assert [m.name for m in grown][:3] == ["WAIT", "GERMINATE_NORM", "GERMINATE_TINY_TEST"]
        assert grown.GERMINATE_TINY_TEST == 2 and grown.CULL == 8
        assert build_action_enum("transformer") is other  # only the topology's own enum is dropped
    finally:
        BlueprintRegistry.unregister("cnn", "tiny_test")
    after = build_action_enum("cnn")
    assert after is not grown
    assert [(m.name, m.value) for m in after] == cnn_members()


def test_germinate_action_helpers():
    enum = build_action_enum("transformer")
    assert get_blueprint_from_action(enum.GERMINATE_LORA) == "lora"
    assert get_blueprint_from_action(enum.WAIT) is None and get_blueprint_from_action(enum.CULL) is None
    assert is_germinate_action(enum.GERMINATE_MLP) and not is_germinate_action(enum.FOSSILIZE)
    assert get_blueprint_from_action(Action.GERMINATE_CONV_HEAVY) == "conv_heavy"
    if HAS_FLEX:
        assert get_blueprint_from_action(enum.GERMINATE_FLEX_ATTENTION) == "flex_attention"


def test_legacy_action_enum():
    assert [(m.name, m.value) for m in Action] == cnn_members()
    assert SimicAction is Action
    blueprint_ids = {
        Action.GERMINATE_NORM: "norm", Action.GERMINATE_ATTENTION: "attention",
        Action.GERMINATE_DEPTHWISE: "depthwise", Action.GERMINATE_CONV_LIGHT: "conv_light",
        Action.GERMINATE_CONV_HEAVY: "conv_heavy",
    }
    for action in Action:
        assert Action.is_germinate(action) is (action in blueprint_ids)
        assert Action.get_blueprint_id(action) == blueprint_ids.get(action)
    # the legacy enum agrees with the cnn enum built from the registry
    assert [(m.name, m.value) for m in build_action_enum("cnn")] == [(m.name, m.value) for m in Action]
