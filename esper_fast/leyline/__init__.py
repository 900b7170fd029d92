"""Leyline: the data contracts shared by every part of Esper (stages, gates, reports,
signals, actions, telemetry and lifecycle constants).

Value-compatible with ``esper.leyline``: the same names, members, fields, defaults and
numbers, so one set of types flows through the training layer and the programs on top of it.
"""

LEYLINE_VERSION = "0.2.0"

# ---- lifecycle constants shared by controllers and reward shaping
MIN_CULL_AGE = 10  # epochs a seed must live before a cull is allowed
FULL_EVALUATION_AGE = 10  # epochs for a confident judgement of a seed
MIN_PROBATION_EPOCHS = 5  # epochs in PROBATIONARY for the full fossilize bonus
MIN_GERMINATE_EPOCH = 5  # no germination before this epoch
MIN_PLATEAU_TO_GERMINATE = 3  # consecutive epochs of < 0.5% improvement before germinating

from esper_fast.leyline.actions import (  # noqa: E402
    Action,
    SimicAction,
    build_action_enum,
    get_blueprint_from_action,
    is_germinate_action,
)
from esper_fast.leyline.stages import (  # noqa: E402
    VALID_TRANSITIONS,
    CommandType,
    RiskLevel,
    SeedStage,
    is_active_stage,
    is_failure_stage,
    is_terminal_stage,
    is_valid_transition,
)
from esper_fast.leyline.signals import (  # noqa: E402
    TENSOR_SCHEMA_SIZE,
    FastTrainingSignals,
    TensorSchema,
    TrainingMetrics,
    TrainingSignals,
)
from esper_fast.leyline.schemas import (  # noqa: E402
    OPERATION_TARGET_STAGE,
    AdaptationCommand,
    BlueprintProtocol,
    BlueprintSpec,
    GateLevel,
    GateResult,
    SeedOperation,
)
from esper_fast.leyline.reports import FieldReport, SeedMetrics, SeedStateReport  # noqa: E402
from esper_fast.leyline.telemetry import (  # noqa: E402
    DEFAULT_BUDGETS,
    PerformanceBudgets,
    SeedTelemetry,
    TelemetryEvent,
    TelemetryEventType,
)

__all__ = [
    "LEYLINE_VERSION",
    "MIN_CULL_AGE",
    "FULL_EVALUATION_AGE",
    "MIN_PROBATION_EPOCHS",
    "MIN_GERMINATE_EPOCH",
    "MIN_PLATEAU_TO_GERMINATE",
    "Action",
    "SimicAction",
    "build_action_enum",
    "get_blueprint_from_action",
    "is_germinate_action",
    "SeedStage",
    "CommandType",
    "RiskLevel",
    "VALID_TRANSITIONS",
    "is_valid_transition",
    "is_terminal_stage",
    "is_active_stage",
    "is_failure_stage",
    "TensorSchema",
    "TENSOR_SCHEMA_SIZE",
    "FastTrainingSignals",
    "TrainingMetrics",
    "TrainingSignals",
    "SeedOperation",
    "OPERATION_TARGET_STAGE",
    "AdaptationCommand",
    "GateLevel",
    "GateResult",
    "BlueprintProtocol",
    "BlueprintSpec",
    "SeedMetrics",
    "SeedStateReport",
    "FieldReport",
    "TelemetryEventType",
    "TelemetryEvent",
    "PerformanceBudgets",
    "DEFAULT_BUDGETS",
    "SeedTelemetry",
]
