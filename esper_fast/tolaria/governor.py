"""The Tolaria governor: a fail-safe watchdog over the training loss.

It keeps a Last Known Good snapshot of the model, watches each loss for catastrophic
failure (NaN/Inf, a statistical explosion, a sudden fall to random-guess loss) and rolls the
model back in place, returning a report and a punishment reward for the RL agent.

Snapshots go through :class:`esper_fast.ops.HostSnapshot`: every tensor of the state dict is
copied into one persistent page-locked host buffer in a few launches (or kept on the device
with ``snapshot_mode="device"``), and rollback copies it back into the model's own tensors.
Under :func:`esper_fast.ops.reference_mode` the original per-tensor path is used instead.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from esper_fast.leyline import SeedStage
from esper_fast.ops.mode import using_reference
from esper_fast.ops.reference import restore_reference, snapshot_reference
from esper_fast.ops.snapshot import HostSnapshot

__all__ = ["TolariaGovernor", "GovernorReport"]

# Statistics (and the lobotomy test) need this many losses before they mean anything.
MIN_HISTORY = 10
# Lobotomy: the run was doing well (mean below this fraction of the random-guess loss) ...
LOBOTOMY_HEALTHY_FRACTION = 0.6
# ... and the loss lands within this fraction of the random-guess loss.
LOBOTOMY_TOLERANCE = 0.065

# A slot's extra-state entries about the candidates incubating beside its seed.
_RIVAL_ENTRIES = frozenset({"rival_states", "candidate_generators"})
_SNAPSHOT_MODES = ("host", "device")
_OPTIMIZER_ROLLBACK = ("restore", "reset")


@dataclass
class GovernorReport:
    """What a rollback did and why."""

    reason: str
    loss_at_panic: float
    loss_threshold: float
    consecutive_panics: int
    rollback_occurred: bool


def _as_optimizer_list(optimizers) -> list:
    if optimizers is None:
        return []
    if isinstance(optimizers, torch.optim.Optimizer):
        return [optimizers]
    return list(optimizers)


class TolariaGovernor:
    """Watches the training loss and rolls the model back to its Last Known Good state.

    Args (the original's, same order and defaults):
        model: the model to protect; an initial snapshot is taken here.
        sensitivity: sigmas above the history mean a loss must exceed to be anomalous.
        multiplier: times the history mean a loss must exceed to be anomalous.
        absolute_threshold: a loss must also exceed this to be anomalous.
        death_penalty: ``get_punishment_reward()`` returns its negative.
        history_window: losses kept for the statistics.
        min_panics_before_rollback: consecutive anomalies before ``check_vital_signs`` is True.
        random_guess_loss: the loss of uniform predictions (default ``ln(10)``, CIFAR-10).

    Keyword-only options (defaults keep the original behaviour):
        optimizers: an optimizer or a list of them whose state is snapshotted with the
            weights and, at rollback, restored or reset (see ``optimizer_rollback``).
            ``None``: optimizers are left alone, as in the original.
        optimizer_rollback: ``"restore"`` (the state saved with the weights) or ``"reset"``
            (cleared, as if the optimizer were new; ``param_groups`` and learning rates kept).
        snapshot_mode: ``"host"`` (one page-locked host buffer, the default) or ``"device"``
            (one copy on the model's device: instant rollback for small models; then
            ``last_good_state`` holds device tensors).
        clear_live_seed_state: what a rollback leaves in a slot whose live seed it culls.
            False (the original's behaviour): the slot's lifecycle state saved in the
            snapshot (``seed_slot._extra_state``) is restored, so when the snapshot was taken
            with that seed alive, ``seed_state`` afterwards describes a seed whose module is
            gone. True: the slot is left empty (``seed_state is None``).

    ``last_good_state`` maps each state-dict key to a tensor that does not require grad
    (views into the snapshot buffer) and each non-tensor value to a deep copy. Parameters
    and buffers of a live (not FOSSILIZED) seed are left out. The governor watches every
    slot of the model (``model.seed_slots`` where the model has several, else
    ``model.seed_slot``): the snapshot covers them all and a rollback culls every live seed.
    """

    def __init__(
        self,
        model: nn.Module,
        sensitivity: float = 6.0,
        multiplier: float = 3.0,
        absolute_threshold: float = 10.0,
        death_penalty: float = 10.0,
        history_window: int = 20,
        min_panics_before_rollback: int = 2,
        random_guess_loss: float | None = None,
        *,
        optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
        optimizer_rollback: str = "restore",
        snapshot_mode: str = "host",
        clear_live_seed_state: bool = False,
    ):
        if snapshot_mode not in _SNAPSHOT_MODES:
            raise ValueError(f"esper_fast: snapshot_mode must be one of {_SNAPSHOT_MODES}, got {snapshot_mode!r}")
        if optimizer_rollback not in _OPTIMIZER_ROLLBACK:
            raise ValueError(
                f"esper_fast: optimizer_rollback must be one of {_OPTIMIZER_ROLLBACK}, got {optimizer_rollback!r}"
            )
        self.model = model
        self.sensitivity = sensitivity
        self.multiplier = multiplier
        self.absolute_threshold = absolute_threshold
        self.death_penalty = death_penalty
        self.loss_history: deque[float] = deque(maxlen=history_window)
        self.consecutive_panics = 0
        self.min_panics_before_rollback = min_panics_before_rollback
        self.random_guess_loss = random_guess_loss if random_guess_loss is not None else math.log(10)
        self.optimizers = _as_optimizer_list(optimizers)
        self.optimizer_rollback = optimizer_rollback
        self.snapshot_mode = snapshot_mode
        self.clear_live_seed_state = clear_live_seed_state
        self._pending_panic = False  # an anomaly was seen and not yet cleared by a normal loss
        self._panic_loss: float | None = None  # the loss that triggered the latest panic
        device_resident = snapshot_mode == "device"
        self._model_snapshot = HostSnapshot(device_resident=device_resident)
        self._optimizer_snapshot = HostSnapshot(device_resident=device_resident)
        self._optimizer_params: list = []  # per tracked optimizer: its params at snapshot time
        self._optimizer_devices: dict = {}  # state key -> device of the state tensor
        self._plain_state: dict | None = None  # a reference-mode snapshot or one assigned by the user
        self._plain_optimizer_states: list | None = None
        self.snapshot()

    # ---------------------------------------------------------------- snapshot
    @property
    def last_good_state(self) -> dict[str, Any] | None:
        """The committed Last Known Good state: key -> tensor view or deep-copied value."""
        if self._plain_state is not None:
            return self._plain_state
        return self._model_snapshot.state

    @last_good_state.setter
    def last_good_state(self, state: dict[str, Any] | None) -> None:
        # None forgets the snapshot; a mapping becomes the state the next rollback restores.
        self._plain_state = None if state is None else dict(state)
        if state is None:
            self._model_snapshot.clear()

    def snapshot(self, non_blocking: bool = False) -> None:
        """Save the Last Known Good state (and tracked optimizer state) off the GPU.

        Live seed parameters and buffers are left out. With ``non_blocking=True`` the copies
        are enqueued on the current CUDA stream and the call returns at once; the snapshot
        commits when they complete, and until then ``last_good_state`` is the previous one.
        An exception or interrupt during a snapshot leaves the previous snapshot intact.
        """
        prefixes = self._live_seed_prefixes()
        if using_reference():
            keys = self.model.state_dict(keep_vars=True) if prefixes else ()
            exclude = frozenset(key for key in keys if key.startswith(prefixes))
            self._plain_state = snapshot_reference(self.model, exclude=exclude)
            if prefixes:
                self._plain_state.update(self._live_slot_extra_states(self._plain_state))
            self._plain_optimizer_states = [copy.deepcopy(opt.state_dict()) for opt in self.optimizers]
            return
        state = self.model.state_dict(keep_vars=True)
        if prefixes:
            state = {key: value for key, value in state.items() if not key.startswith(prefixes)}
            state.update(self._live_slot_extra_states(state))
        self._model_snapshot.capture(state, non_blocking=non_blocking)
        if self.optimizers:
            params, optimizer_state = self._optimizer_state()
            self._optimizer_snapshot.capture(optimizer_state, non_blocking=non_blocking)
            self._optimizer_params = params
            self._optimizer_devices = {
                key: value.device for key, value in optimizer_state.items() if isinstance(value, torch.Tensor)
            }
        self._plain_state = None
        self._plain_optimizer_states = None

    def _seed_slots(self) -> list:
        """Every seed slot of the model, in host order: ``model.seed_slots`` (a model with
        several slots) or ``model.seed_slot`` (any model with one, the original's included)."""
        slots = getattr(self.model, "seed_slots", None)
        if slots is not None:
            return list(slots.values())
        slot = getattr(self.model, "seed_slot", None)
        return [] if slot is None else [slot]

    def _live_seed_slots(self) -> list:
        """The slots holding a live (not FOSSILIZED) seed state."""
        live = []
        for slot in self._seed_slots():
            state = getattr(slot, "state", None)
            if state is not None and state.stage != SeedStage.FOSSILIZED:
                live.append(slot)
        return live

    def _live_seed_prefixes(self) -> tuple:
        """State-dict key prefixes owned by the live seeds (their modules and alpha schedules)."""
        owned = [
            m
            for slot in self._live_seed_slots()
            for m in (getattr(slot, "seed", None), getattr(slot, "alpha_schedule", None), getattr(slot, "rivals", None))
            if isinstance(m, nn.Module)
        ]
        if not owned:
            return ()
        # A slot may be registered under several names (model.seed_slot and host.slots.<id>).
        modules = self.model.named_modules(remove_duplicate=False)
        return tuple(name + "." for name, module in modules if any(module is m for m in owned))

    def _live_slot_extra_states(self, state) -> dict:
        """The live seeds' slots as a snapshot records them, replacing their entries in
        ``state``. The seeds are culled at rollback, so restoring their lifecycle state would
        leave a state without a seed: with ``clear_live_seed_state`` the slot is recorded
        empty (no seed state, no ramp); otherwise the lead's state stays, as in the original,
        but not its rival candidates', whose modules no rollback brings back."""
        live = self._live_seed_slots()
        names = {
            name + "._extra_state"
            for name, m in self.model.named_modules(remove_duplicate=False)
            if any(m is slot for slot in live)
        }
        entries = {}
        for key in names & state.keys():
            if self.clear_live_seed_state:
                entries[key] = {"seed_state": None, "alpha_schedule": None}
            elif isinstance(state[key], dict) and _RIVAL_ENTRIES & state[key].keys():
                entries[key] = {k: v for k, v in state[key].items() if k not in _RIVAL_ENTRIES}
        return entries

    def _optimizer_state(self):
        """(params per optimizer, flat mapping (optimizer, param, name) -> state value)."""
        params, flat = [], {}
        for o, optimizer in enumerate(self.optimizers):
            group_params = [p for group in optimizer.param_groups for p in group["params"]]
            params.append(group_params)
            for i, p in enumerate(group_params):
                for name, value in optimizer.state.get(p, {}).items():
                    flat[(o, i, name)] = value
        return params, flat

    # ------------------------------------------------------------ vital signs
    def check_vital_signs(self, current_loss: float | torch.Tensor) -> bool:
        """True when the loss says the model must be rolled back (see API.md for the rules).

        NaN/Inf and a lobotomy (a healthy run suddenly at random-guess loss) panic at once;
        otherwise, with at least 10 losses of history, a loss above the absolute threshold,
        ``mean + sensitivity * std`` and ``mean * multiplier`` is an anomaly, kept out of the
        history, and ``min_panics_before_rollback`` consecutive anomalies panic.
        """
        loss = float(current_loss)
        if math.isnan(loss) or math.isinf(loss):
            return self._panic_now(loss)
        history = self.loss_history
        if len(history) < MIN_HISTORY:
            history.append(loss)
            return False
        mean, std = self._history_stats()
        healthy = mean < LOBOTOMY_HEALTHY_FRACTION * self.random_guess_loss
        if healthy and abs(loss - self.random_guess_loss) < LOBOTOMY_TOLERANCE * self.random_guess_loss:
            return self._panic_now(loss)
        is_anomaly = (
            loss > self.absolute_threshold
            and loss > mean + self.sensitivity * std
            and loss > mean * self.multiplier
        )
        if is_anomaly:
            self.consecutive_panics += 1
            self._pending_panic = True
            self._panic_loss = loss
            return self.consecutive_panics >= self.min_panics_before_rollback
        history.append(loss)
        self.consecutive_panics = 0
        self._pending_panic = False
        return False

    def _panic_now(self, loss: float) -> bool:
        self._pending_panic = False
        self._panic_loss = loss
        self.consecutive_panics = self.min_panics_before_rollback
        return True

    def _history_stats(self) -> tuple[float, float]:
        """Mean and population standard deviation of the loss history (0, 0 when empty)."""
        history = self.loss_history
        if not history:
            return 0.0, 0.0
        mean = sum(history) / len(history)
        variance = sum((x - mean) ** 2 for x in history) / len(history)
        # A constant history has std 0: the statistical test then reduces to `loss > mean`,
        # which is correct (a constant loss has no anomalies to measure spread against).
        std = math.sqrt(variance) if variance > 0 else 0.0
        return mean, std

    # --------------------------------------------------------------- rollback
    def execute_rollback(
        self,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        optimizers: Iterable[torch.optim.Optimizer] | None = None,
    ) -> GovernorReport:
        """Cull every live seed, restore the Last Known Good state in place, report.

        Parameters keep their identity (optimizers stay valid); buffers such as BatchNorm
        running statistics are restored too. Tracked optimizers (the governor's
        ``optimizers``) are restored or reset per ``optimizer_rollback``; an ``optimizer`` /
        ``optimizers`` given here that is not tracked has no snapshot and is reset. A
        non-blocking snapshot in flight is waited for, so a rollback always restores a
        complete snapshot. Raises ``RuntimeError`` when there is no snapshot.
        """
        print("[GOVERNOR] CRITICAL INSTABILITY DETECTED. INITIATING ROLLBACK.")
        mean, std = self._history_stats()
        threshold = mean + self.sensitivity * std
        self._model_snapshot.wait()
        self._optimizer_snapshot.wait()
        state = self.last_good_state
        if state is None:
            raise RuntimeError("Governor panic before first snapshot!")

        for slot in self._live_seed_slots():
            slot.cull("governor_rollback")

        if self._plain_state is not None or using_reference():
            restore_reference(self.model, state, strict=False)
        else:
            self._model_snapshot.restore(self.model.state_dict(keep_vars=True))
            extras = {key: value for key, value in state.items() if not isinstance(value, torch.Tensor)}
            if extras:
                # The snapshot's own objects, as the original hands them over: the restored
                # seed state is the snapshot's (a later change to it changes the snapshot).
                self.model.load_state_dict(extras, strict=False)

        self._rollback_optimizers(_as_optimizer_list(optimizer) + _as_optimizer_list(optimizers))
        self.consecutive_panics = 0
        return GovernorReport(
            reason="Structural Collapse",
            loss_at_panic=self._panic_loss if self._panic_loss is not None else float("nan"),
            loss_threshold=threshold,
            consecutive_panics=self.consecutive_panics,
            rollback_occurred=True,
        )

    def _rollback_optimizers(self, extra: list) -> None:
        tracked_ids = {id(opt) for opt in self.optimizers}
        for opt in extra:
            if id(opt) not in tracked_ids:
                opt.state.clear()
        if not self.optimizers:
            return
        if self.optimizer_rollback == "reset":
            for opt in self.optimizers:
                opt.state.clear()
        elif self._plain_optimizer_states is not None:
            for opt, saved in zip(self.optimizers, self._plain_optimizer_states):
                opt.load_state_dict(saved)
        else:
            self._restore_optimizer_state()

    def _restore_optimizer_state(self) -> None:
        """Put each tracked optimizer's state back exactly as it was at the snapshot."""
        saved = self._optimizer_snapshot.state
        if saved is None:
            return
        rebuilt = [{} for _ in self.optimizers]  # per optimizer: param -> state dict
        targets = {}
        for key, value in saved.items():
            o, i, name = key
            param = self._optimizer_params[o][i]
            current = self.optimizers[o].state.get(param, {}).get(name)
            if isinstance(value, torch.Tensor):
                fits = (
                    isinstance(current, torch.Tensor)
                    and current.shape == value.shape
                    and current.dtype == value.dtype
                )
                # Reuse the live tensor when it fits (in place); otherwise a fresh one where it lived.
                if not fits:
                    current = torch.empty(value.shape, dtype=value.dtype, device=self._optimizer_devices[key])
                targets[key] = current
                rebuilt[o].setdefault(param, {})[name] = current
            else:
                rebuilt[o].setdefault(param, {})[name] = copy.deepcopy(value)
        self._optimizer_snapshot.restore(targets)
        for opt, states in zip(self.optimizers, rebuilt):
            opt.state.clear()
            opt.state.update(states)

    # ------------------------------------------------------------------ misc
    def get_punishment_reward(self) -> float:
        """The negative reward for the RL agent: ``-death_penalty``."""
        return -self.death_penalty

    def reset(self) -> None:
        """Clear the loss history and panic state, and take a fresh snapshot (a new episode)."""
        self.loss_history.clear()
        self.consecutive_panics = 0
        self._pending_panic = False
        self._panic_loss = None
        self.snapshot()
