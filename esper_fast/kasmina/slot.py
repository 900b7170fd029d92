"""The seed slot: one seed module carried through its lifecycle at one injection point.

A slot holds at most one seed (``seed``, an ``nn.Module``) and its ``state`` (a
:class:`SeedState`). The lifecycle moves GERMINATED -> TRAINING -> BLENDING -> SHADOWING ->
PROBATIONARY -> FOSSILIZED, each step guarded by a :class:`QualityGates` check; any stage
before FOSSILIZED may be culled, which drops the seed. Every decision (gates, dwell times,
ramp, telemetry and its data keys, RNG use of the shape probes) is the original's, so a
program makes the same decisions on either. Options that change results are keyword-only
and off by default (``strict_transitions``, ``auto_blend_ramp``).

Candidates. :meth:`SeedSlot.germinate_candidates` germinates several blueprints at once,
each from the random state a germination of it alone would have drawn from. The first is the
slot's ``seed``/``state`` (the *lead*); the others are its *rivals* (``rivals``,
``rival_states``). They incubate together: in TRAINING every candidate runs on the detached
host features through the straight-through estimator, so the forward's value is the host's
and each candidate gets the gradient it would get alone. :meth:`SeedSlot.keep_candidate`
ends the incubation (the winner becomes the lead, the others are culled). A slot with one
candidate is exactly the single-seed slot: no ``rivals`` module, the same ``state_dict``.

The forward pass joins the seed through the fused operators (:func:`ste_forward`,
:func:`blend_with_isolation`). By default it is fenced off from torch.compile like the
original's (``torch.compiler.disable``: stage-dependent control flow would specialise the
graph). ``compilable=True`` lets torch.compile trace it: one graph per (stage, flags), with
alpha read from a device copy kept current by :meth:`SeedSlot.set_alpha`,
:meth:`SeedSlot.force_alpha` and checkpoint loading, so the alpha ramp does not recompile.
"""

from __future__ import annotations

import os
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterator

import torch
import torch.nn as nn

from esper_fast.kasmina.configurations import forward_slot_groups, slot_key, straight_through
from esper_fast.kasmina.gates import QualityGates
from esper_fast.kasmina.isolation import AlphaSchedule, GradientIsolationMonitor, blend_with_isolation, ste_forward
from esper_fast.kasmina.stages import InvalidTransitionError
from esper_fast.kasmina.topologies import (  # noqa: F401  (the probe sizes, also named here)
    CNN_SHAPE_PROBE_SPATIAL,
    TOPOLOGIES,
    TRANSFORMER_SHAPE_PROBE_SEQ_LEN,
    topology_of,
)
from esper_fast.leyline import (
    VALID_TRANSITIONS,
    GateLevel,
    GateResult,
    SeedStage,
    SeedStateReport,
    SeedTelemetry,
    TelemetryEvent,
    TelemetryEventType,
    is_active_stage,
    is_failure_stage,
    is_valid_transition,
)
from esper_fast.leyline import SeedMetrics as LeylineSeedMetrics

__all__ = ["SeedMetrics", "SeedState", "QualityGates", "SeedSlot", "Candidate"]

# ESPER_DEBUG_STE=1 asserts that the seed output carries a gradient on the STE path.
_DEBUG_STE = os.environ.get("ESPER_DEBUG_STE", "").lower() in ("1", "true", "yes")

STAGE_HISTORY_LENGTH = 100
DEFAULT_BLENDING_STEPS = 5


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _trainable_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ============================================================================ metrics & state


@dataclass(slots=True)
class SeedMetrics:
    """What a seed has achieved: accuracies in percent (0-100), epoch counters, attribution."""

    epochs_total: int = 0
    epochs_in_current_stage: int = 0
    initial_val_accuracy: float = 0.0
    current_val_accuracy: float = 0.0
    best_val_accuracy: float = 0.0
    accuracy_at_stage_start: float = 0.0
    accuracy_at_blending_start: float = 0.0  # taken at TRAINING -> BLENDING; 0.0 before
    isolation_violations: int = 0
    gradient_norm_avg: float = 0.0
    current_alpha: float = 0.0
    alpha_ramp_step: int = 0
    # real accuracy - accuracy with alpha forced to 0; None until someone measures it
    counterfactual_contribution: float | None = None
    # seed gradient norm / host gradient norm, kept by the training loop (read by G2)
    seed_gradient_norm_ratio: float = 0.0

    def record_accuracy(self, accuracy: float | torch.Tensor) -> None:
        """Record one epoch's validation accuracy (a tensor is read once, here)."""
        if isinstance(accuracy, torch.Tensor):
            accuracy = accuracy.detach().item()
        if self.epochs_total == 0:
            self.initial_val_accuracy = accuracy
            self.accuracy_at_stage_start = accuracy
        self.current_val_accuracy = accuracy
        self.best_val_accuracy = max(self.best_val_accuracy, accuracy)
        self.epochs_total += 1
        self.epochs_in_current_stage += 1

    @property
    def total_improvement(self) -> float:
        return self.current_val_accuracy - self.initial_val_accuracy

    @property
    def improvement_since_stage_start(self) -> float:
        return self.current_val_accuracy - self.accuracy_at_stage_start

    @property
    def blending_delta(self) -> float:
        """Accuracy change since blending began, host drift included (not causal; the
        counterfactual is). 0 if the seed never blended."""
        if self.accuracy_at_blending_start == 0.0:
            return 0.0
        return self.current_val_accuracy - self.accuracy_at_blending_start

    def reset_stage_baseline(self) -> None:
        """Start the per-stage counters again (at a transition)."""
        self.accuracy_at_stage_start = self.current_val_accuracy
        self.epochs_in_current_stage = 0

    def to_leyline(self) -> LeylineSeedMetrics:
        """The contract record of these metrics."""
        return LeylineSeedMetrics(
            epochs_total=self.epochs_total,
            epochs_in_current_stage=self.epochs_in_current_stage,
            initial_val_accuracy=self.initial_val_accuracy,
            current_val_accuracy=self.current_val_accuracy,
            best_val_accuracy=self.best_val_accuracy,
            accuracy_at_stage_start=self.accuracy_at_stage_start,
            total_improvement=self.total_improvement,
            improvement_since_stage_start=self.improvement_since_stage_start,
            isolation_violations=self.isolation_violations,
            gradient_norm_avg=self.gradient_norm_avg,
            current_alpha=self.current_alpha,
            alpha_ramp_step=self.alpha_ramp_step,
        )


@dataclass(kw_only=True)
class SeedState:
    """A seed's place in the lifecycle: stage, alpha, metrics, the transitions so far and its
    telemetry snapshot. Keyword arguments only."""

    seed_id: str
    blueprint_id: str
    slot_id: str = ""
    stage: SeedStage = SeedStage.DORMANT
    previous_stage: SeedStage = SeedStage.UNKNOWN
    previous_epochs_in_stage: int = 0  # epochs spent in previous_stage
    stage_entered_at: datetime = field(default_factory=_utc_now)
    alpha: float = 0.0
    metrics: SeedMetrics = field(default_factory=SeedMetrics)
    blending_steps_done: int = 0
    blending_steps_total: int = 0
    is_healthy: bool = True
    is_paused: bool = False
    # (stage entered, when), bounded so a long run cannot grow it without limit
    stage_history: deque = field(default_factory=lambda: deque(maxlen=STAGE_HISTORY_LENGTH))
    telemetry: SeedTelemetry | None = None

    def __post_init__(self) -> None:
        if self.telemetry is None:
            self.telemetry = SeedTelemetry(seed_id=self.seed_id, blueprint_id=self.blueprint_id)

    def sync_telemetry(
        self,
        gradient_norm: float,
        gradient_health: float,
        has_vanishing: bool,
        has_exploding: bool,
        epoch: int = 0,
        max_epochs: int = 25,
    ) -> None:
        """Refresh the telemetry snapshot from the metrics and the given gradient signals
        (once per epoch, after validation)."""
        t = self.telemetry
        t.accuracy = self.metrics.current_val_accuracy
        t.accuracy_delta = self.metrics.improvement_since_stage_start
        t.epochs_in_stage = self.metrics.epochs_in_current_stage
        t.stage = self.stage.value
        t.alpha = self.alpha
        t.gradient_norm = gradient_norm
        t.gradient_health = gradient_health
        t.has_vanishing = has_vanishing
        t.has_exploding = has_exploding
        t.epoch = epoch
        t.max_epochs = max_epochs
        t.captured_at = _utc_now()

    def can_transition_to(self, new_stage: SeedStage) -> bool:
        return is_valid_transition(self.stage, new_stage)

    def transition(self, new_stage: SeedStage) -> bool:
        """Move to ``new_stage``; False (nothing changes) when the lifecycle forbids it."""
        if not self.can_transition_to(new_stage):
            return False
        self.previous_stage = self.stage
        self.previous_epochs_in_stage = self.metrics.epochs_in_current_stage
        self.stage = new_stage
        self.stage_entered_at = _utc_now()
        self.stage_history.append((new_stage, self.stage_entered_at))
        self.metrics.reset_stage_baseline()
        return True

    @property
    def epochs_in_stage(self) -> int:
        return self.metrics.epochs_in_current_stage

    def increment_epoch(self) -> None:
        """Count an epoch without recording an accuracy."""
        self.metrics.epochs_total += 1
        self.metrics.epochs_in_current_stage += 1

    def record_epoch(self, accuracy: float) -> None:
        self.metrics.record_accuracy(accuracy)

    def to_report(self) -> SeedStateReport:
        """The contract report of this state."""
        return SeedStateReport(
            seed_id=self.seed_id,
            slot_id=self.slot_id,
            blueprint_id=self.blueprint_id,
            stage=self.stage,
            previous_stage=self.previous_stage,
            previous_epochs_in_stage=self.previous_epochs_in_stage,
            stage_entered_at=self.stage_entered_at,
            metrics=self.metrics.to_leyline(),
            is_healthy=self.is_healthy,
            is_improving=self.metrics.improvement_since_stage_start > 0,
            needs_attention=not self.is_healthy or self.metrics.isolation_violations > 0,
        )


# ============================================================================ slot


@dataclass(frozen=True)
class Candidate:
    """One seed incubating in a slot: its module and its lifecycle state."""

    seed: nn.Module
    state: SeedState

    @property
    def blueprint_id(self) -> str:
        return self.state.blueprint_id

    @property
    def seed_id(self) -> str:
        return self.state.seed_id


def _generator_states(device: torch.device) -> dict:
    """The torch generators a germination draws from: the CPU's (weights) and, on CUDA, the
    device's (the shape probe)."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_generator_states(states: dict, device: torch.device) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


def _same_generator_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


class SeedSlot(nn.Module):
    """A place in the host where one seed can grow.

    Args (the original's):
        slot_id: name of the injection point.
        channels: feature channels (cnn) or width (transformer) at the injection point.
        device: where germinated seeds (and shape probes) are placed.
        gates: the :class:`QualityGates` guarding stage transitions.
        on_telemetry: called with a :class:`TelemetryEvent` on lifecycle events.
        fast_mode: no telemetry and no isolation monitor (fast rollouts).
        task_config: anything with ``topology`` ("cnn", the default without one, or
            "transformer"); ``max_epochs``, ``train_to_blend_fraction``,
            ``shadowing_fraction`` and ``blending_steps`` set :meth:`step_epoch`'s dwell times.

    Keyword-only options, off by default (each changes what the original does):
        strict_transitions: :meth:`advance_stage` raises :class:`InvalidTransitionError` for a
            move the lifecycle forbids, instead of returning a failed result.
        auto_blend_ramp: entering BLENDING through :meth:`advance_stage` starts the alpha ramp
            (``task_config.blending_steps`` steps, else 5) when none is running.
        compilable: torch.compile traces the forward (see the module docstring).
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
        *,
        strict_transitions: bool = False,
        auto_blend_ramp: bool = False,
        compilable: bool = False,
    ):
        super().__init__()
        self.slot_id = slot_id
        self.channels = channels
        self.device = torch.device(device) if isinstance(device, str) else device
        self.gates = gates or QualityGates()
        self.on_telemetry = on_telemetry
        self.fast_mode = fast_mode
        self.task_config = task_config
        self.strict_transitions = strict_transitions
        self.auto_blend_ramp = auto_blend_ramp

        self.seed: nn.Module | None = None
        self.state: SeedState | None = None
        self.alpha_schedule: AlphaSchedule | None = None
        self.isolate_gradients: bool = False
        self.isolation_monitor: GradientIsolationMonitor | None = None  # made at the first germination
        # The lead's rivals while several candidates incubate (see the module docstring);
        # the module is registered only then, so a one-candidate slot's state_dict is the original's.
        self.rivals: nn.ModuleList | None = None
        self.rival_states: list[SeedState] = []
        # Per candidate, the generators' states right after its germination (see keep_candidate).
        self._candidate_generators: list[dict] | None = None
        # topology -> (device, probe); one probe per topology, made (and RNG drawn) once per device
        self._shape_probe_cache: dict[str, tuple[torch.device, torch.Tensor]] = {}
        # state.alpha on the device, for a compiled forward (not saved in state_dict)
        self.register_buffer("_alpha_value", torch.zeros((), device=self.device), persistent=False)
        self.compilable = compilable

    # ---------------------------------------------------------------- device

    def _get_shape_probe(self, topology: str) -> torch.Tensor:
        """The cached probe of ``topology`` on this slot's device (drawn from torch's RNG when
        first needed there)."""
        cached = self._shape_probe_cache.get(topology)
        if cached is not None and cached[0] == self.device:
            return cached[1]
        probe = torch.randn(*TOPOLOGIES[topology].probe_shape(self.channels), device=self.device)
        self._shape_probe_cache[topology] = (self.device, probe)
        return probe

    def to(self, *args, **kwargs) -> "SeedSlot":
        """``nn.Module.to``; the slot then places future seeds on the new device (and drops
        its shape probes only when the device changed)."""
        old_device = self.device
        super().to(*args, **kwargs)
        first = next(self.parameters(), None)
        if first is not None:
            self.device = first.device
        else:
            target = torch._C._nn._parse_to(*args, **kwargs)[0]
            if target is not None:
                self.device = target
        if self.device != old_device:
            self._shape_probe_cache.clear()
        return self

    # ---------------------------------------------------------------- properties

    @property
    def is_active(self) -> bool:
        """True while the slot holds a seed and its state (whatever the stage)."""
        return self.seed is not None and self.state is not None

    @property
    def is_live(self) -> bool:
        """True while the seed's fate is open: germinated and not yet fossilized or culled
        (GERMINATED through PROBATIONARY). Counterfactual attribution judges live seeds;
        a fossilized seed is part of the model."""
        return self.is_active and SeedStage.GERMINATED <= self.state.stage <= SeedStage.PROBATIONARY

    @property
    def alpha(self) -> float:
        return self.state.alpha if self.state else 0.0

    @property
    def active_seed_params(self) -> int:
        """Trainable parameters of the seed (0 without one)."""
        return 0 if self.seed is None else _trainable_params(self.seed)

    @property
    def compilable(self) -> bool:
        """Whether torch.compile traces this slot's forward (see the module docstring)."""
        return "forward" in self.__dict__

    @compilable.setter
    def compilable(self, value: bool) -> None:
        # The class's forward is fenced off from the compiler; the traceable one is bound on
        # the instance.
        if value:
            self.forward = self._forward
        else:
            self.__dict__.pop("forward", None)

    def get_parameters(self) -> Iterator[nn.Parameter]:
        """The seed's parameters (an empty iterator without a seed; the lead's while several
        candidates incubate)."""
        return iter([]) if self.seed is None else self.seed.parameters()

    @property
    def candidates(self) -> list[Candidate]:
        """The seeds in the slot, the lead first, then its rivals (empty without a seed)."""
        if not self.is_active:
            return []
        rivals = list(self.rivals) if self.rivals is not None else []
        return [Candidate(self.seed, self.state)] + [Candidate(m, st) for m, st in zip(rivals, self.rival_states)]

    @property
    def has_rivals(self) -> bool:
        """Whether several candidates incubate in the slot."""
        return bool(self.rival_states)

    # ---------------------------------------------------------------- alpha

    def _sync_alpha(self) -> None:
        # The device copy a compiled forward reads; a fill, no host synchronisation. A
        # per-sample alpha forced for an eager forward has no scalar copy.
        alpha = self.alpha
        if isinstance(alpha, torch.Tensor):
            if alpha.numel() != 1:
                return
            alpha = alpha.reshape(())
        with torch.no_grad():
            self._alpha_value.fill_(alpha)

    def set_alpha(self, alpha: float) -> None:
        """Set the blend weight, clamped to [0, 1]; a no-op without a seed."""
        if self.state:
            self.state.alpha = max(0.0, min(1.0, alpha))
            self.state.metrics.current_alpha = self.state.alpha
            self._sync_alpha()

    @contextmanager
    def force_alpha(self, value: float):
        """Within the block alpha is ``value`` (for counterfactual validation, typically 0.0);
        the previous alpha comes back on exit, even on error. A no-op without a seed.
        ``value`` may be a per-sample tensor ``[B]`` for an eager forward (it blends in every
        active stage, TRAINING included).

        Not thread-safe and not re-entrant: use it in single-threaded eval only.
        """
        if self.state is None:
            yield
            return
        state = self.state
        previous = state.alpha
        state.alpha = value
        self._sync_alpha()
        try:
            yield
        finally:
            state.alpha = previous
            self._sync_alpha()

    @contextmanager
    def leading(self, seed_id: str):
        """Within the block the candidate ``seed_id`` is the slot's seed (and state), in the
        lead's place, so that the slot's forward runs it as it would run the lead (for a
        judgement, with :meth:`force_alpha`); the lead comes back on exit, even on error.
        Not thread-safe and not re-entrant."""
        candidates = self.candidates
        ids = [c.seed_id for c in candidates]
        if seed_id not in ids:
            raise ValueError(f"leading: no candidate {seed_id!r} in slot {self.slot_id}; candidates: {ids}")
        index = ids.index(seed_id)
        if index == 0:
            yield
            return
        lead = candidates[0]
        self.seed, self.state = candidates[index].seed, candidates[index].state
        self.rivals[index - 1], self.rival_states[index - 1] = lead.seed, lead.state
        self._sync_alpha()
        try:
            yield
        finally:
            self.rivals[index - 1], self.rival_states[index - 1] = candidates[index].seed, candidates[index].state
            self.seed, self.state = lead.seed, lead.state
            self._sync_alpha()

    def start_blending(self, total_steps: int, temperature: float = 1.0) -> None:
        """Start a sigmoid alpha ramp of ``total_steps`` steps (see :class:`AlphaSchedule`)."""
        if self.state:
            self.state.blending_steps_total = total_steps
            self.state.blending_steps_done = 0
        self.alpha_schedule = AlphaSchedule(total_steps=total_steps, start=0.0, end=1.0, temperature=temperature)

    def update_alpha_for_step(self, step: int) -> float:
        """Set alpha from the ramp at ``step`` and return it (the current alpha without a ramp)."""
        if self.alpha_schedule is None:
            return self.alpha
        alpha = self.alpha_schedule(step)
        self.set_alpha(alpha)
        if self.state:
            self.state.metrics.alpha_ramp_step = step
        return alpha

    # ---------------------------------------------------------------- lifecycle

    def _topology(self) -> str:
        # Without a task_config the slot is a cnn slot, as in the original.
        return topology_of(self.task_config)

    def germinate(
        self,
        blueprint_id: str,
        seed_id: str | None = None,
        host_module: nn.Module | None = None,
    ) -> SeedState:
        """Build seed ``blueprint_id`` for this slot's topology and enter GERMINATED (gate G0).

        Raises RuntimeError if the slot already holds a live seed, AssertionError for an
        unknown topology or blueprint (the message lists the choices) and for a seed that
        changes the feature shape. With ``host_module`` (and not ``fast_mode``) the isolation
        monitor watches host and seed.
        """
        from esper_fast.kasmina.blueprints import BlueprintRegistry

        if self.is_active and not is_failure_stage(self.state.stage):
            raise RuntimeError(f"Slot {self.slot_id} already has active seed")
        topology = self._topology()
        if topology not in TOPOLOGIES:
            raise AssertionError(f"Unknown topology '{topology}' for SeedSlot.germinate")
        try:
            seed = BlueprintRegistry.create(topology, blueprint_id, self.channels)
        except ValueError as exc:
            names = BlueprintRegistry.names(topology)
            raise AssertionError(
                f"Blueprint '{blueprint_id}' not available for topology '{topology}'. Available: {names}"
            ) from exc
        self.seed = seed = seed.to(self.device)
        self._check_shape_preserved(seed, topology, blueprint_id)

        seed_id = seed_id or f"{self.slot_id}-{blueprint_id}"
        self.state = SeedState(seed_id=seed_id, blueprint_id=blueprint_id, slot_id=self.slot_id, stage=SeedStage.DORMANT)
        gate = self.gates.check_gate(self.state, SeedStage.GERMINATED)
        if not gate.passed:
            raise RuntimeError(f"G0 gate failed: {gate.checks_failed}")
        self.state.transition(SeedStage.GERMINATED)
        self._sync_alpha()

        if host_module is not None and not self.fast_mode:
            if self.isolation_monitor is None:
                self.isolation_monitor = GradientIsolationMonitor()
            self.isolation_monitor.register(host_module, seed)

        self._emit_telemetry(
            TelemetryEventType.SEED_GERMINATED,
            data={"blueprint_id": blueprint_id, "seed_id": seed_id, "params": _trainable_params(seed)},
        )
        return self.state

    def germinate_candidates(
        self,
        blueprint_ids,
        seed_ids=None,
        host_module: nn.Module | None = None,
    ) -> list[SeedState]:
        """Germinate several blueprints in this slot to incubate together (see the module
        docstring); returns their states, in the order given.

        Every candidate is built from the same random state, the one a :meth:`germinate` of
        it alone would draw from (its shape probe included), so its initial weights do not
        depend on the others. The generators are then left where the first candidate's
        germination leaves them; :meth:`keep_candidate` moves them to the winner's. One
        blueprint is exactly :meth:`germinate`. ``seed_ids`` default to
        ``<slot>-<blueprint>``; ValueError for no blueprint, a repeated one, or a repeated id.
        """
        blueprint_ids = list(blueprint_ids)
        if not blueprint_ids:
            raise ValueError("germinate_candidates: give at least one blueprint")
        if len(set(blueprint_ids)) != len(blueprint_ids):
            raise ValueError(f"germinate_candidates: a blueprint is named twice in {blueprint_ids}")
        seed_ids = list(seed_ids) if seed_ids is not None else [None] * len(blueprint_ids)
        if len(seed_ids) != len(blueprint_ids):
            raise ValueError(f"germinate_candidates: {len(seed_ids)} seed ids for {len(blueprint_ids)} blueprints")
        named = [s for s in seed_ids if s is not None]
        if len(set(named)) != len(named):
            raise ValueError(f"germinate_candidates: a seed id is given twice in {seed_ids}")
        if len(blueprint_ids) == 1:
            return [self.germinate(blueprint_ids[0], seed_ids[0], host_module)]
        if self.is_active and not is_failure_stage(self.state.stage):
            raise RuntimeError(f"Slot {self.slot_id} already has active seed")

        start, probes = _generator_states(self.device), dict(self._shape_probe_cache)
        built, generators, lead_probes = [], [], None
        try:
            for blueprint_id, seed_id in zip(blueprint_ids, seed_ids):
                _set_generator_states(start, self.device)
                self._shape_probe_cache = dict(probes)
                self.seed, self.state = None, None
                self.germinate(blueprint_id, seed_id, host_module if not built else None)
                built.append((self.seed, self.state))
                generators.append(_generator_states(self.device))
                if lead_probes is None:
                    lead_probes = self._shape_probe_cache
        except BaseException:
            # A candidate that cannot be built leaves the slot empty, as before the call.
            self.seed, self.state = None, None
            self._shape_probe_cache = probes
            _set_generator_states(start, self.device)
            if self.isolation_monitor is not None:
                self.isolation_monitor.reset()
            raise
        # The slot is left as the lead's germination alone leaves it: generators and probe.
        _set_generator_states(generators[0], self.device)
        self._shape_probe_cache = lead_probes
        (self.seed, self.state), rivals = built[0], built[1:]
        self.rivals = nn.ModuleList([seed for seed, _ in rivals])
        self.rival_states = [state for _, state in rivals]
        self._candidate_generators = generators
        return [state for _, state in built]

    def keep_candidate(self, seed_id: str, reason: str = "lost_judgement", details=None) -> list[SeedState]:
        """End the incubation of several candidates: ``seed_id`` becomes the slot's seed and
        the others are culled with ``reason`` (telemetry ``SEED_CULLED`` each, with
        ``details[their seed_id]`` under ``judgement`` when given). Returns the culled states.

        When nothing has drawn from torch's generators since the germination, they are set to
        where the winner's germination alone left them, so that from here on the run is the
        winner's own, bit for bit.
        """
        candidates = self.candidates
        ids = [c.seed_id for c in candidates]
        if seed_id not in ids:
            raise ValueError(f"keep_candidate: no candidate {seed_id!r} in slot {self.slot_id}; candidates: {ids}")
        winner = ids.index(seed_id)
        generators = self._candidate_generators
        if generators is not None and _same_generator_states(_generator_states(self.device), generators[0]):
            _set_generator_states(generators[winner], self.device)
        culled = []
        for index, candidate in enumerate(candidates):
            if index != winner:
                judged = None if details is None else details.get(candidate.seed_id)
                self._cull_candidate(candidate.state, reason, {} if judged is None else {"judgement": judged})
                culled.append(candidate.state)
        self.seed, self.state = candidates[winner].seed, candidates[winner].state
        if winner != 0 and self.isolation_monitor is not None:
            self.isolation_monitor.watch_seed(self.seed)
        self._drop_rivals()
        self._sync_alpha()
        return culled

    def _cull_candidate(self, state: SeedState, reason: str, extra: dict | None = None) -> None:
        # A candidate other than the slot's seed: its state ends CULLED, with the telemetry of a cull.
        summary, old_stage = self._seed_summary(state), state.stage
        if state.transition(SeedStage.CULLED):
            self._emit_telemetry(TelemetryEventType.SEED_STAGE_CHANGED, data={"from": old_stage.name, "to": "CULLED"},
                                 state=state)
            self._emit_telemetry(TelemetryEventType.SEED_CULLED, data={"reason": reason, **summary, **(extra or {})},
                                 state=state)

    def _drop_rivals(self) -> None:
        self.rivals = None
        self.rival_states = []
        self._candidate_generators = None

    def _check_shape_preserved(self, seed: nn.Module, topology: str, blueprint_id: str) -> None:
        # A smoke test in eval mode under no_grad, so no statistics or autograd state change.
        probe = self._get_shape_probe(topology)
        was_training = seed.training
        try:
            seed.eval()
            with torch.no_grad():
                out = seed(probe)
            if isinstance(out, torch.Tensor) and out.shape != probe.shape:
                raise AssertionError(f"Seed '{blueprint_id}' changed shape: {out.shape} vs {probe.shape}")
        finally:
            seed.train(was_training)

    def _seed_summary(self, state: SeedState | None = None) -> dict:
        """The seed's record at a decisive moment, taken before the transition resets the
        stage counters (telemetry data of fossilize and cull)."""
        state = state or self.state
        metrics = state.metrics
        return {
            "blueprint_id": state.blueprint_id,
            "seed_id": state.seed_id,
            "improvement": metrics.total_improvement,
            "blending_delta": metrics.blending_delta,
            "counterfactual": metrics.counterfactual_contribution,
            "epochs_total": metrics.epochs_total,
            "epochs_in_stage": metrics.epochs_in_current_stage,
        }

    def advance_stage(self, target_stage: SeedStage | None = None) -> GateResult:
        """Move the seed to ``target_stage`` (default: the next non-failure stage) if its gate
        passes. Returns the gate result: a failed gate, or a move the lifecycle forbids
        (``checks_failed == ["transition_failed"]``), leaves the stage unchanged."""
        if not self.is_active:
            return GateResult(gate=GateLevel.G0, passed=False, checks_failed=["no_active_seed"])
        if target_stage is None:
            target_stage = next((s for s in VALID_TRANSITIONS.get(self.state.stage, ()) if not is_failure_stage(s)), None)
        if target_stage is None:
            return GateResult(gate=GateLevel.G0, passed=False, checks_failed=["no_valid_transition"])
        if self.strict_transitions and not self.state.can_transition_to(target_stage):
            raise InvalidTransitionError(self.state.stage, SeedStage(target_stage))
        if self.has_rivals and target_stage != SeedStage.TRAINING:
            # Several candidates only incubate: keep_candidate ends that first.
            level = self.gates._get_gate_level(SeedStage(target_stage))
            return GateResult(gate=level, passed=False, checks_failed=["candidates_not_judged"])

        gate = self.gates.check_gate(self.state, target_stage)
        if not gate.passed:
            return gate
        old_stage = self.state.stage
        summary = self._seed_summary()
        if not self.state.transition(target_stage):
            return GateResult(gate=gate.gate, passed=False, checks_failed=["transition_failed"])

        if old_stage == SeedStage.GERMINATED and target_stage == SeedStage.TRAINING:
            self.isolate_gradients = True  # the seed incubates on detached host features
            self._rivals_follow(old_stage, target_stage)
        elif old_stage == SeedStage.TRAINING and target_stage == SeedStage.BLENDING:
            self._enter_blending()
            if self.auto_blend_ramp and self.alpha_schedule is None:
                self.start_blending(self._blending_steps())
        self._emit_stage_changed(old_stage)
        if target_stage == SeedStage.FOSSILIZED:
            epochs = {key: summary.pop(key) for key in ("epochs_total", "epochs_in_stage")}
            data = {**summary, "params_added": _trainable_params(self.seed), **epochs}
            self._emit_telemetry(TelemetryEventType.SEED_FOSSILIZED, data=data)
        return gate

    def _rivals_follow(self, old_stage: SeedStage, target_stage: SeedStage) -> None:
        # Each rival passes its own gate into the stage the lead entered (G1: GERMINATED).
        for state in self.rival_states:
            if state.stage == old_stage and self.gates.check_gate(state, target_stage).passed and state.transition(target_stage):
                self._emit_telemetry(TelemetryEventType.SEED_STAGE_CHANGED,
                                     data={"from": old_stage.name, "to": target_stage.name}, state=state)

    def _enter_blending(self) -> None:
        # Blending lets seed and host co-adapt through the seed branch; the accuracy now is
        # the reference of blending_delta.
        self.isolate_gradients = False
        self.state.metrics.accuracy_at_blending_start = self.state.metrics.current_val_accuracy

    def _emit_stage_changed(self, old_stage: SeedStage) -> None:
        self._emit_telemetry(
            TelemetryEventType.SEED_STAGE_CHANGED, data={"from": old_stage.name, "to": self.state.stage.name}
        )

    def cull(self, reason: str = "") -> bool:
        """Remove the seed. False (and nothing changes) for a FOSSILIZED seed or an empty slot:
        fossils are permanent."""
        if not self.state or self.state.stage == SeedStage.FOSSILIZED:
            return False
        summary = self._seed_summary()
        old_stage = self.state.stage
        if not self.state.transition(SeedStage.CULLED):
            return False
        self._emit_stage_changed(old_stage)
        self._emit_telemetry(TelemetryEventType.SEED_CULLED, data={"reason": reason, **summary})
        for state in self.rival_states:  # a cull ends every candidate
            self._cull_candidate(state, reason)
        self._drop_rivals()
        self.seed = None
        self.state = None
        self.alpha_schedule = None
        self.isolate_gradients = False
        if self.isolation_monitor is not None:
            self.isolation_monitor.reset()
        self._sync_alpha()
        return True

    def _dwell_epochs(self, fraction_name: str) -> int:
        if not self.task_config:
            return 1
        return max(1, int(self.task_config.max_epochs * getattr(self.task_config, fraction_name)))

    def _blending_steps(self) -> int:
        steps = getattr(self.task_config, "blending_steps", None) if self.task_config is not None else None
        return steps if isinstance(steps, int) and steps > 0 else DEFAULT_BLENDING_STEPS

    def _step_into(self, target: SeedStage) -> bool:
        """Enter ``target`` if its gate passes (a lifecycle step of :meth:`step_epoch`)."""
        if not self.gates.check_gate(self.state, target).passed:
            return False
        if not self.state.transition(target):
            raise RuntimeError(f"Illegal lifecycle transition {self.state.stage} → {target.name}")
        return True

    def step_epoch(self) -> None:
        """Advance the lifecycle by the rules of one epoch (call once per epoch, after
        ``state.metrics.record_accuracy``):

        - GERMINATED -> TRAINING at once (gate G1), with gradient isolation on;
        - TRAINING -> BLENDING after ``max(1, int(max_epochs * train_to_blend_fraction))``
          epochs in the stage (1 without a task_config) when G2 passes; then a ramp of
          ``blending_steps`` steps (5 by default) starts;
        - BLENDING: one ramp step per epoch; once the steps are done alpha is set to 1 and
          the seed enters SHADOWING if G3 passes;
        - SHADOWING -> PROBATIONARY after ``shadowing_fraction`` of max_epochs when G4 passes.

        PROBATIONARY -> FOSSILIZED is the caller's decision (``advance_stage``).
        """
        state = self.state
        if not state:
            return
        stage = state.stage
        if stage == SeedStage.GERMINATED:
            if self._step_into(SeedStage.TRAINING):
                self.isolate_gradients = True
                self._emit_stage_changed(stage)
                self._rivals_follow(stage, SeedStage.TRAINING)
        elif stage == SeedStage.TRAINING:
            if self.has_rivals:
                return  # the candidates' incubation ends with keep_candidate
            if state.metrics.epochs_in_current_stage < self._dwell_epochs("train_to_blend_fraction"):
                return
            if self._step_into(SeedStage.BLENDING):
                self._enter_blending()
                self._emit_stage_changed(stage)
                self.start_blending(total_steps=self._blending_steps(), temperature=1.0)
        elif stage == SeedStage.BLENDING:
            state.blending_steps_done += 1
            if self.alpha_schedule is not None:
                self.update_alpha_for_step(state.blending_steps_done)
            if state.blending_steps_done >= state.blending_steps_total:
                self.set_alpha(1.0)
                if self._step_into(SeedStage.SHADOWING):
                    self._emit_stage_changed(stage)
        elif stage == SeedStage.SHADOWING:
            if state.metrics.epochs_in_current_stage < self._dwell_epochs("shadowing_fraction"):
                return
            if self._step_into(SeedStage.PROBATIONARY):
                self._emit_stage_changed(stage)

    def get_state_report(self) -> SeedStateReport | None:
        """The contract report of the seed's state (None without a seed)."""
        return self.state.to_report() if self.state else None

    def _emit_telemetry(self, event_type: TelemetryEventType, data: dict | None = None,
                        state: SeedState | None = None) -> None:
        """Send one event to ``on_telemetry`` (nothing in fast_mode or without a callback),
        about ``state``'s seed (default: the slot's seed)."""
        if self.fast_mode or self.on_telemetry is None:
            return
        state = state or self.state
        event = TelemetryEvent(
            event_type=event_type,
            seed_id=state.seed_id if state else None,
            slot_id=self.slot_id,
            data=data or {},
        )
        self.on_telemetry(event)

    # ---------------------------------------------------------------- checkpoints

    def get_extra_state(self):
        """The lifecycle in checkpoints: the SeedState and the alpha schedule (and, while
        several candidates incubate, the rivals' states and the generators' states after
        each candidate's germination)."""
        extra = {"seed_state": self.state, "alpha_schedule": self.alpha_schedule}
        if self.has_rivals:
            extra["rival_states"] = list(self.rival_states)
            extra["candidate_generators"] = self._candidate_generators
        return extra

    def set_extra_state(self, state: dict) -> None:
        """Restore what :meth:`get_extra_state` saved. Rivals' tensors load into the rivals
        germinated before loading (:meth:`germinate_candidates`); a state without rivals
        drops any."""
        self.state = state.get("seed_state")
        self.alpha_schedule = state.get("alpha_schedule")
        rivals = state.get("rival_states") or []
        if rivals:
            if self.rivals is None or len(self.rivals) != len(rivals):
                raise RuntimeError(f"slot {self.slot_id}: the checkpoint holds {len(rivals)} rival candidate(s); "
                                   "germinate the same candidates before loading it")
            self.rival_states = list(rivals)
            self._candidate_generators = state.get("candidate_generators")
        else:
            self._drop_rivals()
        self._sync_alpha()

    # ---------------------------------------------------------------- forward

    def _forward(self, host_features: torch.Tensor) -> torch.Tensor:
        """Join the seed into the host features.

        - no seed, or a stage outside TRAINING..FOSSILIZED: ``host_features`` unchanged;
        - the seed sees ``host_features.detach()`` when ``isolate_gradients``;
        - TRAINING with alpha == 0: straight-through estimator (value == host, the gradient
          reaches both);
        - otherwise ``lerp(host, seed, alpha)`` with the host path detached, except for the
          transformer topology in BLENDING..FOSSILIZED where the host keeps its gradient.
        """
        state = self.state
        if not self.is_active or not is_active_stage(state.stage):
            return host_features
        seed_features = self._seed_features(host_features)
        # Alpha is read only in TRAINING: a compiled graph of a later stage does not guard on it.
        if straight_through(state.stage, state.alpha):
            if _DEBUG_STE:
                assert seed_features.requires_grad, "STE needs a seed output that requires grad"
            joined = ste_forward(host_features, seed_features)
            if self.rivals is not None:
                joined = self._join_rivals(joined, host_features)
            return joined
        # Eager passes the float; a compiled graph reads the device copy, so that a new
        # alpha is new data for the same graph rather than a recompile.
        alpha = self._alpha_value if torch.compiler.is_compiling() else state.alpha
        return blend_with_isolation(host_features, seed_features, alpha, detach_host=self._detaches_host())

    def _join_rivals(self, joined: torch.Tensor, host_features: torch.Tensor) -> torch.Tensor:
        # Each rival learns as the lead does: on the host features (detached, as isolation
        # has them in TRAINING), its output straight-through, so the value stays the host's
        # and every candidate gets the same incoming gradient. Without a gradient to learn
        # from and in eval mode a rival changes nothing, and is skipped.
        for rival, state in zip(self.rivals, self.rival_states):
            if state.stage != SeedStage.TRAINING or not (torch.is_grad_enabled() or rival.training):
                continue
            joined = ste_forward(joined, self._seed_features(host_features, rival))
        return joined

    def _seed_features(self, host_features: torch.Tensor, seed: nn.Module | None = None) -> torch.Tensor:
        # With isolate_gradients the seed's gradient does not reach the host through its input.
        seed = self.seed if seed is None else seed
        return seed(host_features.detach() if self.isolate_gradients else host_features)

    def _detaches_host(self) -> bool:
        # The blend's host path keeps its gradient only in the topology's host-gradient stages
        # (a transformer from BLENDING on).
        entry = TOPOLOGIES.get(topology_of(self.task_config))
        return not (entry is not None and self.state.stage in entry.host_gradient_stages)

    def configuration_key(self, alpha=None):
        """What the slot's output is under ``alpha`` (None: the current alpha), as a hashable
        key: equal keys mean bit-identical outputs for the same input
        (:func:`esper_fast.kasmina.configurations.slot_key`)."""
        return slot_key(self, alpha)

    def forward_groups(self, features: torch.Tensor, num_groups: int, requests) -> list[torch.Tensor]:
        """The slot's outputs for several inputs stacked along the batch (eval, no grad):
        :func:`esper_fast.kasmina.configurations.forward_slot_groups`."""
        return forward_slot_groups(self, features, num_groups, requests)

    @torch.compiler.disable
    def forward(self, host_features: torch.Tensor) -> torch.Tensor:
        """See :meth:`_forward`. Fenced off from torch.compile unless ``compilable``."""
        return self._forward(host_features)
