"""The seed slot: one seed module carried through its lifecycle at one injection point.

A slot holds at most one seed (``seed``, an ``nn.Module``) and its ``state`` (a
:class:`SeedState`). The lifecycle moves GERMINATED -> TRAINING -> BLENDING -> SHADOWING ->
PROBATIONARY -> FOSSILIZED, each step guarded by a :class:`QualityGates` check; any stage
before FOSSILIZED may be culled, which drops the seed.

The forward pass (see :meth:`SeedSlot.forward`) is plain Python control flow on stage,
alpha and flags, and fused custom ops on tensors, with no host synchronisation:
torch.compile(fullgraph=True) traces it into one graph per (stage, flags) combination.
A compiled forward reads alpha from a device copy kept by :meth:`SeedSlot.set_alpha` and
:meth:`SeedSlot.force_alpha`, so the alpha ramp does not recompile it (set alpha through
them, not by writing ``state.alpha``); eager passes the Python float, as the original does.
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterator

import torch
import torch.nn as nn

from esper_fast.kasmina.blueprints import TOPOLOGIES, BlueprintRegistry
from esper_fast.kasmina.gates import GateLevel, GateResult, QualityGates
from esper_fast.kasmina.isolation import AlphaSchedule, blend_with_isolation, ste_forward
from esper_fast.kasmina.stages import (
    ACTIVE_STAGES,
    VALID_TRANSITIONS,
    InvalidTransitionError,
    SeedStage,
    is_failure_stage,
    is_valid_transition,
)

# Shape probes used at germination: a seed must preserve these shapes.
CNN_SHAPE_PROBE_SPATIAL = 8
TRANSFORMER_SHAPE_PROBE_SEQ_LEN = 4

# Transformer slots keep the host's gradient on the blend's host path in these stages.
_HOST_GRADIENT_STAGES = frozenset(
    {SeedStage.BLENDING, SeedStage.SHADOWING, SeedStage.PROBATIONARY, SeedStage.FOSSILIZED}
)

DEFAULT_BLENDING_STEPS = 5
STAGE_HISTORY_LENGTH = 100


# ============================================================================ metrics & state


@dataclass
class SeedMetrics:
    """What a seed has achieved: accuracies in percent (0-100), epoch counters, attribution."""

    epochs_total: int = 0
    epochs_in_current_stage: int = 0

    initial_val_accuracy: float = 0.0  # the first accuracy recorded after germination
    current_val_accuracy: float = 0.0
    best_val_accuracy: float = 0.0
    accuracy_at_stage_start: float = 0.0
    accuracy_at_blending_start: float | None = None  # None until the seed enters BLENDING

    # real accuracy - accuracy with alpha forced to 0 (validate_with_attribution); None until measured
    counterfactual_contribution: float | None = None

    gradient_norm_avg: float = 0.0
    current_alpha: float = 0.0
    alpha_ramp_step: int = 0
    seed_param_count: int = 0
    host_param_count: int = 0

    def record_accuracy(self, accuracy: float | torch.Tensor) -> None:
        """Record one epoch's validation accuracy (a tensor is read once, here)."""
        if isinstance(accuracy, torch.Tensor):
            accuracy = accuracy.detach().item()
        accuracy = float(accuracy)
        if self.epochs_total == 0:
            self.initial_val_accuracy = accuracy
            self.accuracy_at_stage_start = accuracy
            self.best_val_accuracy = accuracy
        self.current_val_accuracy = accuracy
        self.best_val_accuracy = max(self.best_val_accuracy, accuracy)
        self.epochs_total += 1
        self.epochs_in_current_stage += 1

    @property
    def accuracy_at_germination(self) -> float:
        return self.initial_val_accuracy

    @property
    def total_improvement(self) -> float:
        return self.current_val_accuracy - self.initial_val_accuracy

    @property
    def improvement_since_stage_start(self) -> float:
        return self.current_val_accuracy - self.accuracy_at_stage_start

    @property
    def blending_delta(self) -> float:
        """Accuracy change since blending began (host drift included; not causal). 0 before BLENDING."""
        if self.accuracy_at_blending_start is None:
            return 0.0
        return self.current_val_accuracy - self.accuracy_at_blending_start

    def reset_stage_baseline(self) -> None:
        self.accuracy_at_stage_start = self.current_val_accuracy
        self.epochs_in_current_stage = 0


@dataclass
class SeedState:
    """A seed's place in the lifecycle: stage, alpha, metrics and the transitions so far."""

    seed_id: str
    blueprint_id: str
    slot_id: str = ""
    stage: SeedStage = SeedStage.DORMANT
    previous_stage: SeedStage = SeedStage.UNKNOWN
    stage_entered_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    alpha: float = 0.0
    metrics: SeedMetrics = field(default_factory=SeedMetrics)
    blending_steps_done: int = 0
    blending_steps_total: int = 0
    is_healthy: bool = True
    # (from_stage, to_stage, when), bounded so a long run cannot grow it without limit
    stage_history: deque = field(default_factory=lambda: deque(maxlen=STAGE_HISTORY_LENGTH))

    @property
    def epochs_in_stage(self) -> int:
        return self.metrics.epochs_in_current_stage

    def can_transition_to(self, new_stage: SeedStage) -> bool:
        return is_valid_transition(self.stage, SeedStage(new_stage))

    def transition(self, new_stage: SeedStage) -> bool:
        """Move to ``new_stage``; raises :class:`InvalidTransitionError` if the lifecycle forbids it."""
        new_stage = SeedStage(new_stage)
        if not self.can_transition_to(new_stage):
            raise InvalidTransitionError(self.stage, new_stage)
        now = datetime.now(timezone.utc)
        self.stage_history.append((self.stage, new_stage, now))
        self.previous_stage = self.stage
        self.stage = new_stage
        self.stage_entered_at = now
        self.metrics.reset_stage_baseline()
        if new_stage == SeedStage.BLENDING:
            self.metrics.accuracy_at_blending_start = self.metrics.current_val_accuracy
        return True

    def record_epoch(self, accuracy: float) -> None:
        self.metrics.record_accuracy(accuracy)


@dataclass
class TelemetryEvent:
    """A lifecycle event passed to a slot's ``on_telemetry`` callback."""

    event_type: str  # germinated | gate_evaluated | stage_changed | fossilized | culled
    slot_id: str
    seed_id: str | None
    data: dict = field(default_factory=dict)


# ============================================================================ slot


class SeedSlot(nn.Module):
    """A place in the host where one seed can grow.

    Args:
        slot_id: name of the injection point.
        channels: feature channels (cnn) or width (transformer) at the injection point.
        device: where germinated seeds are placed.
        gates: the :class:`QualityGates` guarding stage transitions.
        on_telemetry: called with a :class:`TelemetryEvent` on lifecycle events.
        fast_mode: skip telemetry entirely.
        task_config: anything with ``topology`` ("cnn" or "transformer"); ``max_epochs``,
            ``train_to_blend_fraction``, ``shadowing_fraction`` and ``blending_steps`` tune
            :meth:`step_epoch` when present.
    """

    def __init__(
        self,
        slot_id: str,
        channels: int,
        device: torch.device | str = "cpu",
        gates: QualityGates | None = None,
        on_telemetry: Callable[[TelemetryEvent], None] | None = None,
        fast_mode: bool = False,
        task_config=None,
    ):
        super().__init__()
        self.slot_id = slot_id
        self.channels = channels
        self.device = torch.device(device)
        self.gates = gates if gates is not None else QualityGates()
        self.on_telemetry = on_telemetry
        self.fast_mode = fast_mode
        self.task_config = task_config
        self.default_topology = "cnn"  # used when task_config says nothing

        self.seed: nn.Module | None = None
        self.state: SeedState | None = None
        self.alpha_schedule: AlphaSchedule | None = None
        self.isolate_gradients: bool = False
        # state.alpha mirrored on the device: a compiled forward reads this tensor, so a new
        # alpha is new data for the same graph rather than a recompile.
        self.register_buffer("_alpha_value", torch.zeros((), device=self.device), persistent=False)

    def to(self, *args, **kwargs):
        """``nn.Module.to``, also placing future seeds on the new device."""
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        result = super().to(*args, **kwargs)
        if device is not None:
            self.device = device
        return result

    # ---------------------------------------------------------------- properties

    @property
    def topology(self) -> str:
        topology = getattr(self.task_config, "topology", None) or self.default_topology
        if topology not in TOPOLOGIES:
            raise ValueError(f"slot {self.slot_id!r}: unknown topology {topology!r}; choose one of {list(TOPOLOGIES)}")
        return topology

    @property
    def is_active(self) -> bool:
        """True while the slot holds a seed (whatever its stage)."""
        return self.seed is not None and self.state is not None

    @property
    def alpha(self) -> float:
        return self.state.alpha if self.state is not None else 0.0

    @property
    def active_seed_params(self) -> int:
        if self.seed is None:
            return 0
        return sum(p.numel() for p in self.seed.parameters() if p.requires_grad)

    def get_parameters(self) -> Iterator[nn.Parameter]:
        """The seed's parameters (an empty iterator without a seed)."""
        if self.seed is None:
            return iter(())
        return self.seed.parameters()

    # ---------------------------------------------------------------- alpha

    def set_alpha(self, alpha: float) -> None:
        """Set the blend weight, clamped to [0, 1]; a no-op without a seed."""
        if self.state is None:
            return
        self._write_alpha(self.state, max(0.0, min(1.0, float(alpha))))
        self.state.metrics.current_alpha = self.state.alpha

    def _write_alpha(self, state: SeedState, value: float) -> None:
        # Every alpha change goes through here, keeping the device copy current (no sync).
        state.alpha = value
        with torch.no_grad():
            self._alpha_value.fill_(value)

    def start_blending(self, total_steps: int, temperature: float = 1.0) -> None:
        """Start a sigmoid alpha ramp of ``total_steps`` steps (see :class:`AlphaSchedule`)."""
        if self.state is not None:
            self.state.blending_steps_total = total_steps
            self.state.blending_steps_done = 0
        self.alpha_schedule = AlphaSchedule(total_steps=total_steps, start=0.0, end=1.0, temperature=temperature)

    def update_alpha_for_step(self, step: int) -> float:
        """Set alpha from the ramp at ``step`` and return it (the current alpha without a ramp)."""
        if self.alpha_schedule is None:
            return self.alpha
        alpha = self.alpha_schedule(step)
        self.set_alpha(alpha)
        if self.state is not None:
            self.state.metrics.alpha_ramp_step = step
        return alpha

    @contextlib.contextmanager
    def force_alpha(self, value: float):
        """Within the block alpha is ``value`` (clamped) and the ramp is off; both come back on
        exit, even on error. A no-op without a seed. Not re-entrant across threads."""
        state = self.state
        if state is None:
            yield
            return
        previous_alpha, previous_schedule = state.alpha, self.alpha_schedule
        self._write_alpha(state, max(0.0, min(1.0, float(value))))
        self.alpha_schedule = None
        try:
            yield
        finally:
            self._write_alpha(state, previous_alpha)
            self.alpha_schedule = previous_schedule

    # ---------------------------------------------------------------- lifecycle

    def germinate(self, blueprint_id: str, seed_id: str | None = None, host_module: nn.Module | None = None) -> SeedState:
        """Build seed ``blueprint_id`` for this slot's topology and enter GERMINATED (gate G0).

        Raises RuntimeError if the slot already holds a live seed, ValueError for an unknown
        blueprint (the message lists the choices), and RuntimeError if the seed changes the
        feature shape.
        """
        if self.is_active and not is_failure_stage(self.state.stage):
            raise RuntimeError(
                f"slot {self.slot_id!r} already holds seed {self.state.seed_id!r} in {self.state.stage.name}; cull it first"
            )
        topology = self.topology
        seed = BlueprintRegistry.create(topology, blueprint_id, self.channels).to(self.device)
        self._check_shape_preserved(seed, topology, blueprint_id)

        state = SeedState(seed_id=seed_id or f"{self.slot_id}-{blueprint_id}", blueprint_id=blueprint_id, slot_id=self.slot_id)
        state.metrics.seed_param_count = sum(p.numel() for p in seed.parameters() if p.requires_grad)
        if host_module is not None:
            state.metrics.host_param_count = sum(p.numel() for p in host_module.parameters() if p.requires_grad)
        gate = self.gates.check_gate(state, SeedStage.GERMINATED)
        if not gate.passed:
            raise RuntimeError(f"slot {self.slot_id!r}: gate G0 failed: {gate.checks_failed}")
        state.transition(SeedStage.GERMINATED)

        self.seed, self.state = seed, state
        self._write_alpha(state, state.alpha)
        self.alpha_schedule = None
        self.isolate_gradients = False
        self._emit("germinated", blueprint_id=blueprint_id, params=state.metrics.seed_param_count)
        return state

    def _check_shape_preserved(self, seed: nn.Module, topology: str, blueprint_id: str) -> None:
        if topology == "cnn":
            shape = (1, self.channels, CNN_SHAPE_PROBE_SPATIAL, CNN_SHAPE_PROBE_SPATIAL)
        else:
            shape = (2, TRANSFORMER_SHAPE_PROBE_SEQ_LEN, self.channels)
        probe = torch.randn(shape, device=self.device)
        was_training = seed.training
        try:
            seed.eval()
            with torch.no_grad():
                out = seed(probe)
        finally:
            seed.train(was_training)
        if out.shape != probe.shape:
            raise RuntimeError(f"seed {blueprint_id!r} changed the feature shape: {tuple(probe.shape)} -> {tuple(out.shape)}")

    def advance_stage(self, target_stage: SeedStage | None = None) -> GateResult:
        """Move the seed to ``target_stage`` (default: the next stage) if its gate passes.

        Returns the gate result; a failed gate leaves the stage unchanged. A target the
        lifecycle forbids from the current stage raises :class:`InvalidTransitionError`.
        """
        if not self.is_active:
            return GateResult(GateLevel.G0, False, checks_failed=["no_active_seed"])
        current = self.state.stage
        if target_stage is None:
            target_stage = next((s for s in VALID_TRANSITIONS[current] if not is_failure_stage(s)), None)
            if target_stage is None:
                return GateResult(GateLevel.G0, False, checks_failed=["no_valid_transition"])
        target_stage = SeedStage(target_stage)
        if not is_valid_transition(current, target_stage):
            raise InvalidTransitionError(current, target_stage)

        gate = self.gates.check_gate(self.state, target_stage)
        self._emit("gate_evaluated", gate=gate.gate.name, passed=gate.passed, target=target_stage.name,
                   checks_failed=list(gate.checks_failed))
        if gate.passed:
            self._enter(target_stage)
        return gate

    def _enter(self, target_stage: SeedStage) -> None:
        """Transition and apply the stage-entry rules."""
        old = self.state.stage
        improvement = self.state.metrics.total_improvement
        self.state.transition(target_stage)
        if target_stage == SeedStage.TRAINING:
            # The seed trains on detached host features: it cannot push gradients into the host.
            self.isolate_gradients = True
        elif target_stage == SeedStage.BLENDING:
            # Blending lets seed and host co-adapt through the seed branch.
            self.isolate_gradients = False
            if self.alpha_schedule is None:
                self.start_blending(self._config("blending_steps", DEFAULT_BLENDING_STEPS))
        self._emit("stage_changed", from_stage=old.name, to_stage=target_stage.name)
        if target_stage == SeedStage.FOSSILIZED:
            self._emit("fossilized", improvement=improvement, params_added=self.active_seed_params)

    def _config(self, name: str, default):
        value = getattr(self.task_config, name, None)
        return default if value is None else value

    def _dwell_epochs(self, fraction_name: str) -> int:
        max_epochs = self._config("max_epochs", None)
        fraction = self._config(fraction_name, None)
        if max_epochs is None or fraction is None:
            return 1
        return max(1, int(max_epochs * fraction))

    def step_epoch(self) -> None:
        """Advance the lifecycle by the rules of one epoch (call once per epoch, after
        ``state.metrics.record_accuracy``):

        - GERMINATED -> TRAINING at once (gate G1);
        - TRAINING -> BLENDING after the dwell (``max_epochs * train_to_blend_fraction``, at
          least 1 epoch) when G2 passes;
        - BLENDING: one ramp step per epoch; when the ramp is done alpha is set to 1 and the
          seed enters SHADOWING if G3 passes;
        - SHADOWING -> PROBATIONARY after the dwell (``shadowing_fraction``) when G4 passes.

        PROBATIONARY -> FOSSILIZED is a decision for the caller (``advance_stage``).
        """
        state = self.state
        if state is None or self.seed is None:
            return
        stage = state.stage
        if stage == SeedStage.GERMINATED:
            self._try_enter(SeedStage.TRAINING)
        elif stage == SeedStage.TRAINING:
            if state.metrics.epochs_in_current_stage >= self._dwell_epochs("train_to_blend_fraction"):
                self._try_enter(SeedStage.BLENDING)
        elif stage == SeedStage.BLENDING:
            state.blending_steps_done += 1
            self.update_alpha_for_step(state.blending_steps_done)
            if state.blending_steps_done >= state.blending_steps_total:
                self.set_alpha(1.0)
                self._try_enter(SeedStage.SHADOWING)
        elif stage == SeedStage.SHADOWING:
            if state.metrics.epochs_in_current_stage >= self._dwell_epochs("shadowing_fraction"):
                self._try_enter(SeedStage.PROBATIONARY)

    def _try_enter(self, target_stage: SeedStage) -> bool:
        gate = self.gates.check_gate(self.state, target_stage)
        if gate.passed:
            self._enter(target_stage)
        return gate.passed

    def cull(self, reason: str = "") -> bool:
        """Remove the seed. False (and nothing changes) for a FOSSILIZED seed or an empty slot."""
        state = self.state
        if state is None or state.stage == SeedStage.FOSSILIZED or not state.can_transition_to(SeedStage.CULLED):
            return False
        old = state.stage
        state.transition(SeedStage.CULLED)
        self._emit("stage_changed", from_stage=old.name, to_stage=SeedStage.CULLED.name)
        self._emit("culled", reason=reason, improvement=state.metrics.total_improvement)
        self.seed = None
        self.state = None
        self.alpha_schedule = None
        self.isolate_gradients = False
        return True

    def _emit(self, event_type: str, **data) -> None:
        if self.fast_mode or self.on_telemetry is None:
            return
        seed_id = self.state.seed_id if self.state is not None else None
        self.on_telemetry(TelemetryEvent(event_type, self.slot_id, seed_id, data))

    # ---------------------------------------------------------------- forward

    def forward(self, host_features: torch.Tensor) -> torch.Tensor:
        """Join the seed into the host features.

        - no seed, or a stage outside TRAINING..FOSSILIZED: ``host_features`` unchanged;
        - the seed sees ``host_features.detach()`` when ``isolate_gradients``;
        - TRAINING with alpha == 0: straight-through estimator (value == host, gradient to both);
        - otherwise ``lerp(host, seed, alpha)`` with the host path detached, except for the
          transformer topology in BLENDING..FOSSILIZED where the host keeps its gradient.
        """
        state = self.state
        seed = self.seed
        if seed is None or state is None or state.stage not in ACTIVE_STAGES:
            return host_features
        seed_input = host_features.detach() if self.isolate_gradients else host_features
        seed_features = seed(seed_input)
        if state.stage == SeedStage.TRAINING and state.alpha == 0.0:
            return ste_forward(host_features, seed_features)
        detach_host = not (self.topology == "transformer" and state.stage in _HOST_GRADIENT_STAGES)
        # Eager passes the float (the original's semantics, no tensor read); a compiled graph
        # reads the device copy so that the alpha ramp does not recompile it every step.
        alpha = self._alpha_value if torch.compiler.is_compiling() else state.alpha
        return blend_with_isolation(host_features, seed_features, alpha, detach_host=detach_host)

    def extra_repr(self) -> str:
        stage = self.state.stage.name if self.state is not None else "EMPTY"
        return f"slot_id={self.slot_id!r}, channels={self.channels}, stage={stage}, alpha={self.alpha:.3f}"


__all__ = [
    "SeedSlot",
    "SeedState",
    "SeedStage",
    "SeedMetrics",
    "QualityGates",
    "GateLevel",
    "GateResult",
    "TelemetryEvent",
    "InvalidTransitionError",
]
