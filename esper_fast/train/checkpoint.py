"""What a checkpoint holds, as plain data, and how a run is rebuilt from it.

:class:`Checkpoint` is the record: it is captured from a run, checked against the run that
would continue it, and put back into that run's model, governor, controllers and optimizers.
Its fields are the keys of the saved payload (:meth:`Checkpoint.to_payload`), after
``format``; a mid-epoch checkpoint's ``progress`` is an :class:`EpochProgress`.

Two versions, both read (:func:`version_for` says which a run writes):

- **1**, a run on the task's default slot alone (no ``--slots``, or ``--slots`` naming that
  slot): exactly what earlier versions of esper-fast train wrote and can still resume.
  ``optimizers["seed"]`` is the seed's optimizer, ``controller`` the slot's controller,
  ``model["isolate_gradients"]`` the slot's flag.
- **2**, any other run: every slot's own, keyed by slot id: ``optimizers["seeds"]`` (the
  slots that hold a seed), ``controller["slots"]``, ``model["isolate_gradients"]``, and, with
  several slots, a mid-epoch ``progress.alpha_starts``. Earlier versions refuse it, as they
  refuse any version but their own.

A checkpoint is an ordinary ``torch.save`` file of dicts, lists, numbers, strings, bools,
``None`` and tensors only, so ``torch.load(path, weights_only=True)`` reads it in any
process, one that never imported esper_fast included. The training layer's objects (the
seed slot's ``SeedState`` with its ``SeedMetrics``, ``SeedTelemetry``, stage history and
datetimes, the ``AlphaSchedule``) are encoded by :func:`encode` into tagged dicts and rebuilt
by :func:`decode`.

To restore a model, the same blueprint is germinated when the slot held a seed, then the
tensor state is loaded strictly and the slot's extra state set. The governor's snapshot is
either taken again from the restored model (a checkpoint at an epoch boundary, where the
snapshot is the model) or rebuilt from the snapshot tensors the checkpoint carries (a
checkpoint in the middle of an epoch).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import enum
import random
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from esper_fast.kasmina.topologies import topology, topology_of
from esper_fast.kasmina.isolation import AlphaSchedule
from esper_fast.kasmina.slot import SeedMetrics, SeedState
from esper_fast.leyline import SeedStage, SeedTelemetry
from esper_fast.train.report import ConfigRecord
from esper_fast.train.run_dir import RunDirError
from esper_fast.train.settings import RunConfig

FORMAT = "esper-fast-train-checkpoint"
VERSION = 2          # the newest this version writes; it reads every version up to it
ONE_SLOT_VERSION = 1  # what a run on the task's default slot writes
_TAG = "__class__"
_EXTRA_STATE = "_extra_state"
# The training layer's classes a checkpoint may hold, by the name it is tagged with.
_CLASSES = {c.__name__: c for c in (SeedState, SeedMetrics, SeedTelemetry, SeedStage, AlphaSchedule)}


class ResumeError(RunDirError):
    """A checkpoint that this run cannot continue from; the message says why."""


# ---------------------------------------------------------------- the record

@dataclasses.dataclass
class EpochProgress:
    """How far an epoch has got. A mid-epoch checkpoint holds it so that the resumed run
    finishes the epoch as an uninterrupted one would: the same batches are drawn again from
    the batch-order generator as the epoch began, the done ones skipped, and the done steps'
    losses are handed to the governor with the others."""

    steps_done: int
    losses: torch.Tensor | None          # the done steps' losses, on the CPU (this process's)
    shuffle_at_epoch_start: torch.Tensor | None  # None for a sharded loader (seed and epoch order it)
    alpha_start: float
    train_time_s: float                  # training time spent on the epoch so far
    started_at: str
    # Several processes: every rank's losses and BatchNorm statistics so far, in rank order.
    losses_by_rank: list | None = None
    norm_statistics_by_rank: list | None = None
    # Version 2: every slot's alpha as the epoch began (alpha_start is the main slot's).
    alpha_starts: dict | None = None

    def to_payload(self) -> dict:
        payload = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("losses_by_rank", "norm_statistics_by_rank", "alpha_starts"):
            if payload[name] is None:
                del payload[name]
        return payload

    @classmethod
    def from_payload(cls, payload: dict | None) -> "EpochProgress | None":
        return None if payload is None else cls(**payload)

    def losses_of(self, rank: int | None) -> torch.Tensor:
        """The done steps' losses of ``rank`` (None: a single process)."""
        return self.losses if rank is None else self.losses_by_rank[rank]


@dataclasses.dataclass
class Checkpoint:
    """A run's whole state after ``position["epochs_done"]`` epochs and
    ``position["steps_done"]`` steps of the next: everything a resumed run needs to continue
    as if it had never stopped (see :mod:`esper_fast.train.session`). ``version``: the format
    of ``model``, ``optimizers``, ``controller`` and ``progress`` (see the module docstring)."""

    version: int
    world_size: int
    config: dict                 # RunConfig.to_record(), resolved
    position: dict               # {"epochs_done": int, "steps_done": int}
    model: dict                  # model_state()
    optimizers: dict             # {"host": optimizer_state(), "seed" (1) or "seeds" (2): ...}
    controller: dict             # SeedController.state_dict() (1), {"slots": {id: ...}} (2)
    governor: dict               # governor_state()
    rng: dict                    # rng_state()
    progress: EpochProgress | None  # set in the middle of an epoch
    log: list[dict]              # every record of metrics.jsonl so far, config first
    rollbacks: int
    kernels: dict                # the kernel tally
    elapsed_s: float             # training time of every session so far

    @classmethod
    def capture(cls, *, config: RunConfig, world_size: int, epochs_done: int, progress: EpochProgress | None,
                model: nn.Module, host_optimizer, seed_optimizers: dict, controllers, governor, device: str,
                shuffle: torch.Generator | None, log: list[dict], rollbacks: int, kernels: dict,
                elapsed_s: float, rival_optimizers: dict | None = None) -> "Checkpoint":
        """The state of a run as it stands, in the version :func:`version_for` gives its
        ``config``; its tensors are copied to the CPU. ``seed_optimizers``: slot id -> the
        optimizer of the seed there; ``controllers``: the run's
        :class:`~esper_fast.train.controller.SlotControllers`. A mid-epoch checkpoint
        (``progress`` given) also holds the governor's snapshot tensors, which the model has
        moved on from."""
        version = version_for(config)
        rivals = {slot_id: {seed_id: optimizer_state(o) for seed_id, o in by_seed.items()}
                  for slot_id, by_seed in (rival_optimizers or {}).items()}
        if version == ONE_SLOT_VERSION:
            optimizers = {"host": optimizer_state(host_optimizer),
                          "seed": optimizer_state(seed_optimizers.get(controllers.main_slot))}
            controller = controllers.main.state_dict()
        else:
            optimizers = {"host": optimizer_state(host_optimizer),
                          "seeds": {slot_id: optimizer_state(o) for slot_id, o in seed_optimizers.items()}}
            controller = {"slots": {slot_id: c.state_dict() for slot_id, c in controllers.by_slot.items()}}
        if rivals:  # candidates incubating: slot id -> seed id -> optimizer state
            optimizers["rivals"] = rivals
        return cls(
            version=version,
            world_size=world_size,
            config=config.to_record(),
            position={"epochs_done": epochs_done, "steps_done": 0 if progress is None else progress.steps_done},
            model=model_state(model, per_slot=version > ONE_SLOT_VERSION),
            optimizers=optimizers,
            controller=controller,
            governor=governor_state(governor, with_snapshot=progress is not None),
            rng=rng_state(device, shuffle),
            progress=progress,
            log=log,
            rollbacks=rollbacks,
            kernels=kernels,
            elapsed_s=elapsed_s,
        )

    @property
    def epochs_done(self) -> int:
        return self.position["epochs_done"]

    @property
    def steps_done(self) -> int:
        return self.position["steps_done"]

    def to_payload(self) -> dict:
        """What ``torch.save`` writes: plain data only."""
        payload = {"format": FORMAT}
        for field in dataclasses.fields(self):
            payload[field.name] = getattr(self, field.name)
        if self.progress is not None:
            payload["progress"] = self.progress.to_payload()
        return payload

    @classmethod
    def from_payload(cls, payload, path: str | Path) -> "Checkpoint":
        """The checkpoint ``torch.load`` read from ``path``; :class:`ResumeError` when it is
        not one that this version of esper-fast train reads."""
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ResumeError(f"{path} is not a checkpoint of this version of esper-fast train")
        version = payload.get("version")
        if isinstance(version, int) and version > VERSION:
            raise ResumeError(f"{path} was written by a newer esper-fast train (checkpoint version {version}; "
                              f"this one reads versions 1 to {VERSION}); resume it with that version")
        if version not in range(1, VERSION + 1):
            raise ResumeError(f"{path} is not a checkpoint of this version of esper-fast train")
        try:
            fields = {f.name: payload[f.name] for f in dataclasses.fields(cls)}
            fields["progress"] = EpochProgress.from_payload(fields["progress"])
        except (KeyError, TypeError):
            raise ResumeError(f"{path} is not a checkpoint of this version of esper-fast train") from None
        return cls(**fields)

    def check_resumable(self, *, world_size: int, steps_per_epoch: int, data_fingerprint: str | None,
                        text_path: str | None) -> None:
        """:class:`ResumeError` unless a run of ``world_size`` processes reading data of this
        fingerprint, ``steps_per_epoch`` steps an epoch, can continue from here."""
        if self.world_size != world_size:
            raise ResumeError(f"the run had {self.world_size} process(es), this one has {world_size}; "
                              f"resume it with --nproc {self.world_size}")
        started = ConfigRecord.from_log(self.log[0])
        if started.data_fingerprint != data_fingerprint:
            raise ResumeError(
                f"the text file {text_path} has changed since the run started; a resumed run must read the same data"
            )
        if started.steps_per_epoch != steps_per_epoch:
            raise ResumeError(f"the data now gives {steps_per_epoch} steps per epoch, the run had "
                              f"{started.steps_per_epoch}; a resumed run must read the same data")

    def restore(self, *, model: nn.Module, governor, controllers, host_optimizer,
                make_seed_optimizer: Callable[[str], torch.optim.Optimizer]) -> dict[str, torch.optim.Optimizer]:
        """Puts the controllers, the model (the same seeds germinated first), the governor
        (its snapshot, history and panic state) and the host optimizer back into a freshly
        built run (its model built with the same slots); returns slot id -> the seed's
        optimizer, made by ``make_seed_optimizer(slot_id)`` once the seeds are back and
        loaded, for every slot that had one (the rival candidates' optimizers:
        :meth:`restore_rival_optimizers`). The random generators are the loop's
        (:func:`restore_rng`): when to set them depends on where the epoch stands."""
        if self.version == ONE_SLOT_VERSION:
            controllers.main.load_state_dict(self.controller)
            seed_states = {} if self.optimizers["seed"] is None else {controllers.main_slot: self.optimizers["seed"]}
        else:
            saved = self.controller["slots"]
            if list(saved) != list(controllers.by_slot):
                raise ResumeError(f"the checkpoint holds the slots {', '.join(saved)}, the run has "
                                  f"{', '.join(controllers.by_slot)}")
            for slot_id, controller in controllers.by_slot.items():
                controller.load_state_dict(saved[slot_id])
            seed_states = self.optimizers["seeds"]
        snapshot = self.governor["snapshot"]

        def snapshot_first(extras):
            # The governor's Last Known Good state is older than the model (a mid-epoch
            # checkpoint): load it, snapshot it, then load the model itself.
            if snapshot is not None:
                model.load_state_dict({**snapshot, **extras}, strict=False)
                governor.snapshot()

        germinated_before = {c.slot.slot_id: bool(c.seeds) for c in controllers.by_slot.values()}
        restore_model(model, self.model, germinated_before=germinated_before, before_load=snapshot_first)
        if snapshot is None:
            governor.snapshot()
        restore_governor(governor, self.governor)
        host_optimizer.load_state_dict(self.optimizers["host"])
        seed_optimizers = {}
        for slot_id, state in seed_states.items():
            seed_optimizers[slot_id] = make_seed_optimizer(slot_id)
            seed_optimizers[slot_id].load_state_dict(state)
        return seed_optimizers

    def restore_rival_optimizers(self, make_optimizer: Callable[[str, str], torch.optim.Optimizer]) -> dict:
        """Slot id -> seed id -> the optimizer of each rival candidate the checkpoint holds, made
        by ``make_optimizer(slot_id, seed_id)`` (after :meth:`restore`) and loaded."""
        restored = {}
        for slot_id, by_seed in self.optimizers.get("rivals", {}).items():
            for seed_id, state in by_seed.items():
                optimizer = make_optimizer(slot_id, seed_id)
                optimizer.load_state_dict(state)
                restored.setdefault(slot_id, {})[seed_id] = optimizer
        return restored


def version_for(config: RunConfig) -> int:
    """The checkpoint version a run of ``config`` writes: 1 for a run on the task's default
    slot alone (``slots`` unset), which earlier versions can resume; else 2."""
    return ONE_SLOT_VERSION if config.slots is None else VERSION


# ---------------------------------------------------------------- plain-data codec


def encode(value):
    """``value`` as plain data; the training layer's objects become tagged dicts."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, enum.Enum):
        return {_TAG: _known(type(value)), "value": value.value}
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, datetime.datetime):
        return {_TAG: "datetime", "iso": value.isoformat()}
    if isinstance(value, collections.deque):
        return {_TAG: "deque", "maxlen": value.maxlen, "items": [encode(v) for v in value]}
    if isinstance(value, tuple):
        return {_TAG: "tuple", "items": [encode(v) for v in value]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and k != _TAG for k in value):
            return {k: encode(v) for k, v in value.items()}
        return {_TAG: "dict", "items": [[encode(k), encode(v)] for k, v in value.items()]}
    if dataclasses.is_dataclass(value):
        name = _known(type(value))
        return {_TAG: name, "fields": {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    name = _known(type(value))
    return {_TAG: name, "attrs": {k: encode(v) for k, v in vars(value).items()}}


def _known(cls) -> str:
    if _CLASSES.get(cls.__name__) is not cls:
        raise TypeError(f"esper_fast: a checkpoint cannot hold a {cls.__module__}.{cls.__qualname__}")
    return cls.__name__


def decode(value):
    """The inverse of :func:`encode`."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    tag = value.get(_TAG)
    if tag is None:
        return {k: decode(v) for k, v in value.items()}
    if tag == "datetime":
        return datetime.datetime.fromisoformat(value["iso"])
    if tag == "deque":
        return collections.deque((decode(v) for v in value["items"]), maxlen=value["maxlen"])
    if tag == "tuple":
        return tuple(decode(v) for v in value["items"])
    if tag == "dict":
        return {decode(k): decode(v) for k, v in value["items"]}
    cls = _CLASSES[tag]
    if "value" in value:
        return cls(value["value"])
    if "fields" in value:
        # Fields the class no longer has are dropped; new ones keep their defaults.
        fields = {f.name: f for f in dataclasses.fields(cls)}
        given = {k: decode(v) for k, v in value["fields"].items() if k in fields}
        obj = cls(**{k: v for k, v in given.items() if fields[k].init})
        for k, v in given.items():
            if not fields[k].init:
                setattr(obj, k, v)
        return obj
    obj = cls.__new__(cls)
    obj.__dict__.update({k: decode(v) for k, v in value["attrs"].items()})
    return obj


def _to_cpu(value):
    """A copy of a (nested) optimizer state with its tensors on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


# ---------------------------------------------------------------- model and seed slot

def model_state(model: nn.Module, per_slot: bool = False) -> dict:
    """Host and seed tensors (on the CPU), every slot's lifecycle state (its extra state,
    encoded) and the gradient-isolation flag, which the extra state does not carry: the main
    slot's, or with ``per_slot`` every slot's by id."""
    state = model.state_dict()
    extras = [key for key in state if key.endswith(_EXTRA_STATE)]
    # One CPU copy per distinct tensor: tied weights, and the seed under both of its names
    # (model.seed_slot and host.slots.<id>), stay shared and are saved once.
    copies: dict = {}
    tensors = collections.OrderedDict()
    for key, value in state.items():
        if key in extras:
            continue
        identity = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(), value.dtype,
                    tuple(value.shape), tuple(value.stride()))
        if identity not in copies:
            copies[identity] = value.detach().to("cpu", copy=True)
        tensors[key] = copies[identity]
    slots = model.seed_slots
    return {
        "tensors": tensors,
        "extra_states": {key: encode(state[key]) for key in extras},
        "isolate_gradients": ({slot_id: bool(slot.isolate_gradients) for slot_id, slot in slots.items()} if per_slot
                              else bool(model.seed_slot.isolate_gradients)),
    }


def restore_model(model: nn.Module, state: dict, *, germinated_before: dict[str, bool], before_load=None) -> None:
    """Puts ``state`` (from :func:`model_state`) into a freshly built ``model`` with the same slots.

    A slot that held a seed gets the same blueprint germinated first, so that the tensor
    state loads strictly. ``germinated_before[slot_id]``: the run had germinated a seed
    there, now gone; one is germinated and culled again so the slot's shape probe, drawn
    from torch's RNG at the slot's first germination in a process, is not drawn a second
    time later. ``before_load()`` runs after germination and before the tensors are loaded
    (the governor's snapshot).
    """
    extras = {key: decode(value) for key, value in state["extra_states"].items()}
    for slot_id, slot in model.seed_slots.items():
        extra = extras.get(f"host.slots.{slot_id}.{_EXTRA_STATE}", {})
        seed_state, rivals = extra.get("seed_state"), extra.get("rival_states") or []
        if seed_state is not None and rivals:
            states = [seed_state, *rivals]
            model.germinate_candidates([s.blueprint_id for s in states], [s.seed_id for s in states], slot=slot_id)
        elif seed_state is not None:
            model.germinate_seed(seed_state.blueprint_id, seed_state.seed_id, slot=slot_id)
        elif germinated_before.get(slot_id):
            model.germinate_seed(slot_blueprint(model), "probe", slot=slot_id)
            slot.cull("resume")
    if before_load is not None:
        before_load(extras)
    model.load_state_dict({**state["tensors"], **extras}, strict=True)
    flags = state["isolate_gradients"]
    if not isinstance(flags, dict):  # version 1: the main slot's
        flags = {model.slot_id: flags}
    for slot_id, flag in flags.items():
        model.slot(slot_id).isolate_gradients = flag


def slot_blueprint(model: nn.Module) -> str:
    """The smallest blueprint of the model's topology (any will do for the shape probe)."""
    return topology(topology_of(model.seed_slot.task_config)).blueprints()[0]


# ---------------------------------------------------------------- optimizers and governor

def optimizer_state(optimizer: torch.optim.Optimizer | None) -> dict | None:
    return None if optimizer is None else _to_cpu(optimizer.state_dict())


def governor_state(governor, with_snapshot: bool) -> dict:
    """The governor's loss history and panic state; with ``with_snapshot``, also the tensors
    of its Last Known Good snapshot (needed when the model has moved on from it)."""
    snapshot = None
    if with_snapshot and governor.last_good_state is not None:
        snapshot = collections.OrderedDict(
            (k, v.detach().cpu().clone()) for k, v in governor.last_good_state.items() if isinstance(v, torch.Tensor)
        )
    return {
        "loss_history": list(governor.loss_history),
        "consecutive_panics": governor.consecutive_panics,
        "pending_panic": governor._pending_panic,
        "panic_loss": governor._panic_loss,
        "snapshot": snapshot,
    }


def restore_governor(governor, state: dict) -> None:
    """The loss history and panic state (the snapshot is the loop's business, see
    :func:`restore_model`)."""
    governor.loss_history.clear()
    governor.loss_history.extend(state["loss_history"])
    governor.consecutive_panics = state["consecutive_panics"]
    governor._pending_panic = state["pending_panic"]
    governor._panic_loss = state["panic_loss"]


# ---------------------------------------------------------------- random number generators

def rng_state(device: str, shuffle: torch.Generator | None) -> dict:
    """torch's CPU (and CUDA, on a CUDA run) generators, Python's and numpy's, and the
    generator of the training batch order."""
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(torch.device(device)) if device.startswith("cuda") else None,
        "python": encode(random.getstate()),
        "numpy": None,
        "shuffle": None if shuffle is None else shuffle.get_state(),
    }
    try:
        import numpy as np
    except ImportError:
        return state
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state["numpy"] = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return state


def restore_rng(state: dict, device: str, shuffle: torch.Generator | None, *, torch_generators: bool = True) -> None:
    """Sets every generator :func:`rng_state` saved. ``torch_generators=False`` leaves
    torch's CPU and CUDA generators to :func:`restore_torch_rng` (a resumed epoch sets them
    only once its data loader has drawn its seed)."""
    random.setstate(decode(state["python"]))
    if state["numpy"] is not None:
        import numpy as np

        saved = state["numpy"]
        np.random.set_state((saved["name"], saved["keys"].numpy().astype(np.uint32), saved["pos"],
                             saved["has_gauss"], saved["cached_gaussian"]))
    if shuffle is not None and state["shuffle"] is not None:
        shuffle.set_state(state["shuffle"])
    if torch_generators:
        restore_torch_rng(state, device)


def restore_torch_rng(state: dict, device: str) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.startswith("cuda"):
        torch.cuda.set_rng_state(state["cuda"], torch.device(device))
