"""What a run is given: :class:`RunConfig`, the defaults that depend on the task, and the
rules its slots and blueprints follow (:func:`with_slots`)."""

from __future__ import annotations

import dataclasses
import functools

from esper_fast.kasmina.topologies import topology as topology_entry


def optional(**kwargs):
    """A dataclass field that only some runs have: None, and left out of the record
    (:func:`as_record`) when None, so that the records of runs without it read as before."""
    return dataclasses.field(default=None, metadata={"optional": True}, **kwargs)


def as_record(instance) -> dict:
    """A dataclass instance's fields in order, as plain data for the log and checkpoints: an
    :func:`optional` field left out when None."""
    return {field.name: getattr(instance, field.name) for field in dataclasses.fields(instance)
            if getattr(instance, field.name) is not None or not field.metadata.get("optional")}


# Per task: the seed blueprint, batch size, sequence length and learning rate a run uses
# when the flag is not given. Tuples are (on CPU, on CUDA).
# The blueprint is the default of the task's topology (one entry per topology holds it).
TASK_DEFAULTS = {
    "cifar10": {"blueprint": topology_entry("cnn").default_blueprint, "batch_size": (128, 128), "seq_len": None,
                "lr": 0.05},
    "tinystories": {"blueprint": topology_entry("transformer").default_blueprint, "batch_size": (8, 32),
                    "seq_len": (64, None), "lr": 3e-4},
}
TASKS = tuple(TASK_DEFAULTS)
DEFAULT_OUT = "runs/latest"
DEFAULT_KEEP_CHECKPOINTS = 2


@dataclasses.dataclass
class RunConfig:
    """Everything ``esper-fast train`` takes. ``None`` means the task's default
    (:data:`TASK_DEFAULTS`); :func:`resolve` fills those in so that a run records, and a
    resumed run reuses, the values it actually ran with.

    ``slots``: the seed slots, in the host's order (None: the task's default slot alone,
    see :func:`task_slots`). ``blueprint``: one blueprint for every slot, or one per slot
    in the order of ``slots``, separated by commas (see :func:`slot_blueprints`).
    ``candidates``: blueprints that incubate together in a slot and are judged at the end of
    the incubation, separated by commas; one set for every slot, or one per slot separated by
    ``/`` (see :func:`slot_candidates`). A run with candidates records each slot's first as
    its ``blueprint``.
    """

    task: str = "cifar10"
    epochs: int = 8
    device: str = "cpu"
    data_root: str | None = None
    text_path: str | None = None
    blueprint: str | None = None
    out: str = DEFAULT_OUT
    seed: int = 0
    max_batches: int | None = None
    compile: bool = False
    inject_nan_at: int | None = None
    inject_nan_rank: int = 0        # in a run of several processes, the rank whose step is poisoned
    batch_size: int | None = None
    seq_len: int | None = None
    lr: float | None = None
    progress: bool = True
    keep_checkpoints: int = DEFAULT_KEEP_CHECKPOINTS
    # Left out of the records when None, so that a run on the default slot records exactly
    # what it recorded before slots could be chosen.
    slots: list[str] | None = optional()
    # Blueprints incubated together in each slot (see slot_candidates); left out when None.
    candidates: str | None = optional()

    def to_record(self) -> dict:
        """The settings as the log's ``config`` record and a checkpoint hold them (an unset
        optional field left out); ``RunConfig(**record)`` reads them back."""
        return as_record(self)


def resolve(config: RunConfig, block_size: int | None = None) -> RunConfig:
    """``config`` with every task default filled in. ``block_size`` is the language model's
    context: its sequence-length default on CUDA."""
    defaults = TASK_DEFAULTS[config.task]
    on_cuda = int(config.device.startswith("cuda"))
    seq_len = config.seq_len
    if seq_len is None and defaults["seq_len"] is not None:
        seq_len = defaults["seq_len"][on_cuda] or block_size
        if block_size:
            seq_len = min(seq_len, block_size)
    return dataclasses.replace(
        config,
        blueprint=config.blueprint or defaults["blueprint"],
        batch_size=config.batch_size or defaults["batch_size"][on_cuda],
        seq_len=seq_len,
        lr=config.lr or defaults["lr"],
    )


@functools.lru_cache(maxsize=None)
def task_slots(task: str) -> tuple[tuple[str, ...], str]:
    """The injection points of ``task``'s host, in the host's order, and the task's default
    slot (the model's main slot when built without ``slots``). Read from a model built on the
    meta device: nothing is allocated, no random number is drawn."""
    import torch

    from esper_fast.runtime import get_task_spec

    with torch.device("meta"):
        model = get_task_spec(task).create_model("meta")
    return tuple(model.host.injection_points), model.slot_id


def run_slots(config: RunConfig) -> tuple[str, ...]:
    """The slots the run grows seeds in, in the host's order (the first is the main slot)."""
    return tuple(config.slots) if config.slots else (task_slots(config.task)[1],)


def slot_blueprints(config: RunConfig) -> dict[str, str]:
    """Slot id -> the blueprint it germinates (``config`` resolved): the one blueprint for
    every slot, or each slot's own."""
    slots = run_slots(config)
    names = config.blueprint.split(",")
    if len(names) == 1:
        names = names * len(slots)
    if len(names) != len(slots):
        raise ValueError(f"blueprint {config.blueprint!r} names {len(names)} blueprints for {len(slots)} slots")
    return dict(zip(slots, names))


def slot_candidates(config: RunConfig) -> dict[str, tuple[str, ...]]:
    """Slot id -> the blueprints it germinates together (``config`` resolved): the slot's
    candidates, or its one blueprint."""
    blueprints = slot_blueprints(config)
    if not config.candidates:
        return {slot_id: (name,) for slot_id, name in blueprints.items()}
    sets = [tuple(names.split(",")) for names in config.candidates.split("/")]
    if len(sets) == 1:
        sets = sets * len(blueprints)
    return dict(zip(blueprints, sets))


class SettingsError(ValueError):
    """Settings a run cannot have; the message is the whole explanation, in one line."""



def with_slots(config: RunConfig, topology: str) -> RunConfig:
    """``config`` with its slots and blueprints as a run records them, checked against the
    task's host (:class:`SettingsError` for an unknown or repeated slot, an unknown blueprint,
    or a blueprint list of another length than the slots): the slots in the host's order,
    the task's default slot alone becoming None (the run it always was), and a blueprint
    list (one per slot, in the order the slots were given) in the host's order too."""
    from esper_fast.kasmina import BlueprintRegistry

    given = config.slots
    ordered = None
    if given is not None:
        points, default = task_slots(config.task)
        unknown = [slot for slot in given if slot not in points]
        if unknown:
            raise SettingsError(f"unknown slot {unknown[0]!r} for {config.task} ({topology_entry(topology).injection_points}); "
                                f"choose from: {', '.join(points)}")
        repeated = sorted({slot for slot in given if given.count(slot) > 1}, key=points.index)
        if repeated:
            raise SettingsError(f"--slots names {repeated[0]} twice; each slot holds one lifecycle")
        ordered = [point for point in points if point in given]
    choices = BlueprintRegistry.names(topology)
    blueprint = config.blueprint
    if blueprint is not None:
        names = [name.strip() for name in blueprint.split(",")]
        if not all(names):
            raise SettingsError(f"--blueprint: expected names separated by commas, got {blueprint!r}")
        _check_known(names, choices, config.task, topology)
        names = _in_host_order(names, given, ordered, "--blueprint names {n} blueprints for {count} slot(s); give one "
                               "for every slot, or one per slot of --slots in its order")
        blueprint = ",".join(names)
    candidates = config.candidates
    if candidates is not None:
        if config.blueprint is not None:
            raise SettingsError("give --blueprint or --candidates, not both: the candidates are the slot's blueprints")
        sets = _in_host_order(_candidate_sets(candidates, choices, config.task, topology), given, ordered,
                              "--candidates gives {n} sets for {count} slot(s); give one set for every slot, or one "
                              "per slot of --slots in its order, separated by /")
        candidates = "/".join(",".join(names) for names in sets)
        blueprint = ",".join(names[0] for names in sets)
    if ordered is not None and ordered == [default]:
        ordered = None
    return dataclasses.replace(config, slots=ordered, blueprint=blueprint, candidates=candidates)


def _check_known(names, choices, task: str, topology: str) -> None:
    for name in names:
        if name not in choices:
            raise SettingsError(f"unknown blueprint {name!r} for {task} ({topology} host); "
                                f"choose one of: {', '.join(choices)}")


def _in_host_order(values: list, given: list[str] | None, ordered: list[str] | None, mismatch: str) -> list:
    """One value for every slot (kept as one), or one per slot of ``given`` put in the host's
    order (``ordered``); SettingsError(``mismatch``) for another count."""
    count = len(given) if given is not None else 1
    if len(values) > 1 and len(values) != count:
        raise SettingsError(mismatch.format(n=len(values), count=count))
    if len(values) == 1:
        return values
    by_slot = dict(zip(given, values))
    return [by_slot[slot] for slot in ordered]


def _candidate_sets(text: str, choices, task: str, topology: str) -> list[list[str]]:
    sets = []
    for part in text.split("/"):
        names = [name.strip() for name in part.split(",")]
        if not all(names):
            raise SettingsError(f"--candidates: expected blueprint names separated by commas (and / between slots), "
                                f"got {text!r}")
        _check_known(names, choices, task, topology)
        repeated = [name for name in names if names.count(name) > 1]
        if repeated:
            raise SettingsError(f"--candidates names {repeated[0]} twice in one slot; each candidate is a blueprint")
        sets.append(names)
    return sets


def check_trainable(config: RunConfig, topology: str) -> None:
    """:class:`SettingsError` when a blueprint of the run (``config`` with its slots) cannot
    train on the run's device, found by a probe at start-up rather than epochs later."""
    from esper_fast.kasmina.blueprints import training_failure

    given = config.candidates.replace("/", ",") if config.candidates else None
    names = dict.fromkeys((given or config.blueprint or TASK_DEFAULTS[config.task]["blueprint"]).split(","))
    for name in names:
        failure = training_failure(topology, name, config.device)
        if failure is not None:
            raise SettingsError(f"--blueprint {name} cannot train on {config.device} ({failure}); "
                                "choose another blueprint or device")


def check_device(device: str) -> None:
    """:class:`SettingsError` unless ``device`` is cpu, or a CUDA device present here."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise SettingsError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingsError(f"--device {device} asked for CUDA, but CUDA is not available here; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise SettingsError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif parsed.type != "cpu":
        raise SettingsError(f"unsupported device {device!r}; use cpu, cuda or cuda:N")
