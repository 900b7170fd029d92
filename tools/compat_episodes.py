#!/usr/bin/env python3
"""Run esper-lite's training episodes on esper-lite and on esper_fast, side by side.

This is a developer tool. It works on a checkout of esper-lite that *you* provide and
copies nothing into this project.

For each seed it runs one episode of ``esper.simic.training.run_heuristic_episode``
(``--loop heuristic``, with ``esper.tamiyo.HeuristicTamiyo``) or of
``esper.simic.training.run_ppo_episode`` (``--loop ppo``, with a fresh, seeded
``esper.simic.ppo.PPOAgent`` and ``deterministic=False``), on CPU, in two subprocesses:

``original``
    ``PYTHONPATH=<esper-lite>/src``: esper-lite as it is.
``fast``
    this project first on the path, then ``<esper-lite>/src``; ``esper_fast.install_as_esper()``
    is called before anything imports ``esper``, so esper.leyline / kasmina / tolaria /
    runtime / utils are esper_fast's while esper.simic / tamiyo / nissa stay esper-lite's.

Each subprocess records, per epoch: the train/val loss and accuracy fed to the signal
tracker, the plateau count and host-stabilised flag it returned, the seed stage the policy
saw, the action taken (and, for the heuristic, its reason; for PPO, the observation
features, the action mask, log-prob and value), the reward, and the seed stage, alpha and
blueprint after the action. It also records the episode's result tuple
``(final val accuracy, action counts, rewards)``. The recording only observes: it wraps
``policy.decide`` / ``agent.get_action``, subclasses ``esper.tamiyo.SignalTracker`` to read
``update()``'s arguments and result, wraps ``esper.tolaria.create_model`` to get hold of the
model and wraps that model's ``train`` method to read ``model.seed_state`` at the start of
the next epoch (which is after the previous epoch's action). Nothing that the episode
computes is changed.

The parent compares the two records epoch by epoch and prints, per seed, either
``identical over N epochs`` or the first divergence (epoch, field, both values) with the
epochs around it. Discrete fields (actions, stages, masks) must match exactly; float fields
match within ``--atol``/``--rtol`` (default 0: bitwise).

Data: ``--data mock`` (default) is ``task_spec.create_dataloaders(mock=True, ...)``, i.e.
esper-lite's own synthetic loaders (for cifar10: 2 batches of Gaussian noise with random
labels, drawn from torch's global RNG, which is seeded with the episode seed first).
``--data synthetic`` (cifar10 only) is a learnable class-conditional CIFAR-shaped set with
``--train-batches`` batches, so that accuracy moves and the lifecycle is exercised harder.

Two more loops go past TRAINING (the episodes above never do: G2 needs
``seed_gradient_norm_ratio``, which only esper.simic.vectorized sets):

``--loop vectorized``
    ``esper.simic.vectorized.train_ppo_vectorized`` on CPU (``--n-envs`` envs, ``--episodes``
    episodes, ``--epochs`` max_epochs, num_workers=0); its data loaders are the task's own mock
    loaders at ``--batch-size`` (``--data mock``) or the synthetic set per env (``--data
    synthetic``, shuffled with the generator the function passes). Recorded per (batch, env,
    epoch) by subclasses/wrappers put where the function looks names up (TolariaGovernor,
    SignalTracker, PPOAgent and its network's get_action_batch / store_transition / update,
    RewardNormalizer, compute_*_reward, create_model, a telemetry backend on the nissa hub):
    losses/accuracies, the seed's stage/alpha/metrics before and after the action, the
    observation, mask, action, log-prob, value, reward arguments (counterfactual contribution
    included) and rewards, the governor's checks, snapshots and rollbacks, the telemetry events,
    parameter digests, torch's RNG state, the PPO update metrics and the returned history.
``--loop lifecycle``
    a driver in this file on the training layer only (esper.tolaria / kasmina / runtime via the
    ``esper.*`` names): create_model (cifar10, or ``--task tinystories`` with a small host on a
    synthetic token set), the train_epoch_* loop the stage calls for, validate_and_get_metrics
    (per class), validate_with_attribution once a seed is live (contribution and
    ``--grad-ratio`` written into its metrics), a TolariaGovernor (check on the val loss,
    rollback with fresh optimizers on panic, snapshot otherwise), seed_slot.step_epoch() and a
    fixed policy (see ``child_lifecycle``). Losses are compared within ``--loss-rtol``
    (the fused validation loss is not bitwise); everything else, parameters included, exactly.
    ``--reseed-each-epoch`` reseeds torch's RNG at every epoch start, so that a difference in
    how often one side draws from it does not hide later differences.

``--inject-nan-at EPOCH`` corrupts a host weight at the start of that epoch (``--inject-kind
nan``, or ``scale``: the output weight times ``--inject-scale``, a finite explosion; the
vectorized loop feeds a NaN loss to the policy before its governor acts, so it needs
``scale``); ``--params-out DIR`` keeps the per-record parameter files (torch.save).

Usage
-----
Run it with an interpreter that has torch, pyyaml and pydantic (esper-lite's nissa needs
them) and esper_fast::

    python tools/compat_episodes.py --esper-lite /tmp/esper-lite --seeds 1 2 3 --epochs 40
    python tools/compat_episodes.py --esper-lite /tmp/esper-lite --loop ppo --seeds 1 --epochs 25
    python tools/compat_episodes.py --esper-lite /tmp/esper-lite --sides original original  # determinism check
    python tools/compat_episodes.py --esper-lite /tmp/esper-lite --sides original --show    # one side, print epochs
    python tools/compat_episodes.py --esper-lite /tmp/esper-lite --loop vectorized --seeds 1 --epochs 30 --episodes 4
    python tools/compat_episodes.py --esper-lite /tmp/esper-lite --loop lifecycle --data synthetic --inject-nan-at 12

Options: ``--task cifar10|tinystories``, ``--batch-size`` (default 32), ``--max-batches``
(heuristic only; default none), ``--threads`` (torch threads per subprocess, default 1),
``--serial`` (run the two sides one after the other instead of at once), ``--json OUT``
(save both records), ``--show`` (print each side's per-epoch table), ``--timeout`` (seconds
per subprocess).

Exit status: 0 when every seed is identical (or within tolerance), 1 on a divergence,
2 when a side failed to run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Per-epoch fields compared exactly / with tolerance.
DISCRETE_FIELDS = (
    "stage_seen", "action", "reason", "plateau_epochs", "host_stabilized",
    "stage_after", "seed_id", "blueprint_id", "mask",
)
FLOAT_FIELDS = (
    "train_loss", "train_acc", "val_loss", "val_acc", "reward", "alpha_after",
    "log_prob", "value", "features",
)


# ---------------------------------------------------------------------------
# Child: run the episodes on one side and record them
# ---------------------------------------------------------------------------


def _stage_of(state):
    if state is None:
        return None
    stage = getattr(state, "stage", None)
    return getattr(stage, "name", str(stage))


def _float(value):
    try:
        import torch

        if isinstance(value, torch.Tensor):
            value = value.item()
    except ImportError:  # pragma: no cover
        pass
    return None if value is None else float(value)


def child_main(args) -> int:
    if args.side == "fast":
        import esper_fast

        install = getattr(esper_fast, "install_as_esper", None)
        if install is None:
            raise SystemExit(
                f"compat_episodes: esper_fast ({esper_fast.__file__}) has no install_as_esper()"
            )
        install()

    import importlib
    import random

    import torch

    torch.set_num_threads(args.threads)
    training = importlib.import_module("esper.simic.training")
    tamiyo = importlib.import_module("esper.tamiyo")
    tolaria = importlib.import_module("esper.tolaria")
    runtime = importlib.import_module("esper.runtime")
    modules = {
        name: getattr(importlib.import_module(f"esper.{name}"), "__file__", None)
        for name in ("leyline", "kasmina", "tolaria", "runtime", "utils", "simic", "tamiyo", "nissa")
    }
    if args.loop == "vectorized":
        return child_vectorized(args, modules)
    if args.loop == "lifecycle":
        return child_lifecycle(args, modules)

    state = {"records": [], "model": None, "pending": None}

    def snapshot_after(model):
        record = state["pending"]
        if record is None:
            return
        seed_state = model.seed_state
        record["stage_after"] = _stage_of(seed_state)
        record["seed_id"] = getattr(seed_state, "seed_id", None) if seed_state is not None else None
        record["blueprint_id"] = getattr(seed_state, "blueprint_id", None) if seed_state is not None else None
        record["alpha_after"] = _float(getattr(seed_state, "alpha", None)) if seed_state is not None else None
        state["pending"] = None

    original_create_model = tolaria.create_model

    def create_model(*a, **kw):
        model = original_create_model(*a, **kw)
        bound_train = model.train

        def train(mode=True):
            if mode:
                snapshot_after(model)
            return bound_train(mode)

        model.train = train  # instance attribute: observes, then calls the real train()
        state["model"] = model
        return model

    tolaria.create_model = create_model

    class RecordingSignalTracker(tamiyo.SignalTracker):
        def update(self, *a, **kw):
            signals = super().update(*a, **kw)
            metrics = signals.metrics
            record = {
                "epoch": int(kw.get("epoch", a[0] if a else -1)),
                "train_loss": _float(kw.get("train_loss")),
                "train_acc": _float(kw.get("train_accuracy")),
                "val_loss": _float(kw.get("val_loss")),
                "val_acc": _float(kw.get("val_accuracy")),
                "plateau_epochs": int(metrics.plateau_epochs),
                "host_stabilized": bool(getattr(metrics, "host_stabilized", False)),
            }
            state["records"].append(record)
            return signals

    tamiyo.SignalTracker = RecordingSignalTracker

    task_spec_factory = runtime.get_task_spec
    results = []
    for seed in args.seeds:
        state.update(records=[], model=None, pending=None)
        task_spec = task_spec_factory(args.task)
        torch.manual_seed(seed)
        random.seed(seed)
        trainloader, testloader = make_loaders(args, task_spec, seed)

        started = time.perf_counter()
        if args.loop == "heuristic":
            policy = tamiyo.HeuristicTamiyo(topology=task_spec.topology)
            real_decide = policy.decide

            def decide(signals, active_seeds, _real=real_decide):
                decision = _real(signals, active_seeds)
                record = state["records"][-1]
                record["stage_seen"] = _stage_of(state["model"].seed_state)
                record["action"] = decision.action.name
                record["reason"] = decision.reason
                state["pending"] = record
                return decision

            policy.decide = decide
            result = training.run_heuristic_episode(
                policy=policy,
                trainloader=trainloader,
                testloader=testloader,
                max_epochs=args.epochs,
                max_batches=args.max_batches,
                base_seed=seed,
                device="cpu",
                task_spec=task_spec,
            )
        else:
            ppo = importlib.import_module("esper.simic.ppo")
            leyline = importlib.import_module("esper.leyline")
            state_dim = 35 + leyline.SeedTelemetry.feature_dim()
            torch.manual_seed(seed)
            agent = ppo.PPOAgent(state_dim=state_dim, action_dim=len(task_spec.action_enum), device="cpu")
            real_get_action = agent.get_action
            action_enum = task_spec.action_enum

            def get_action(obs, mask, *a, _real=real_get_action, **kw):
                out = _real(obs, mask, *a, **kw)
                action_idx, log_prob, value = out[0], out[1], out[2]
                record = state["records"][-1]
                record["stage_seen"] = _stage_of(state["model"].seed_state)
                record["action"] = action_enum(int(action_idx)).name
                record["features"] = [float(v) for v in obs.reshape(-1).tolist()]
                record["mask"] = [float(v) for v in mask.reshape(-1).tolist()]
                record["log_prob"] = _float(log_prob)
                record["value"] = _float(value)
                state["pending"] = record
                return out

            agent.get_action = get_action
            result = training.run_ppo_episode(
                agent=agent,
                trainloader=trainloader,
                testloader=testloader,
                max_epochs=args.epochs,
                base_seed=seed,
                device="cpu",
                task_spec=task_spec,
                use_telemetry=True,
                collect_rollout=True,
                deterministic=False,
            )
        elapsed = time.perf_counter() - started
        if state["model"] is not None:
            snapshot_after(state["model"])
        final_acc, action_counts, rewards = result
        for record, reward in zip(state["records"], rewards):
            record["reward"] = _float(reward)
        model = state["model"]
        results.append({
            "seed": seed,
            "seconds": elapsed,
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}" if model is not None else None,
            "epochs": state["records"],
            "final": {
                "val_acc": _float(final_acc),
                "action_counts": dict(action_counts),
                "rewards": [_float(r) for r in rewards],
            },
        })
        print(f"[{args.side}] seed {seed}: {len(state['records'])} epochs in {elapsed:.1f}s, "
              f"final acc {final_acc:.2f}", file=sys.stderr, flush=True)

    payload = {"side": args.side, "modules": modules, "torch": torch.__version__, "results": results}
    Path(args.out).write_text(json.dumps(payload), encoding="utf-8")
    return 0


def make_loaders(args, task_spec, seed):
    """Dataloaders for one episode (torch's global RNG is already seeded with ``seed``)."""
    if args.data == "mock":
        overrides = {"mock": True, "batch_size": args.batch_size, "num_workers": 0}
        if task_spec.task_type == "lm":
            overrides.update(block_size=args.block_size, max_train_samples=args.lm_samples,
                             max_val_samples=args.lm_samples)
        return task_spec.create_dataloaders(**overrides)
    if task_spec.task_type == "lm":
        raise SystemExit("compat_episodes: --data synthetic is for cifar10 only")
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(10, 3, 32, 32, generator=gen)

    def make(n):
        labels = torch.randint(0, 10, (n,), generator=gen)
        images = 0.5 * prototypes[labels] + torch.randn(n, 3, 32, 32, generator=gen)
        return TensorDataset(images, labels)

    n_train = args.batch_size * args.train_batches
    n_val = args.batch_size * max(1, args.train_batches // 2)
    train = DataLoader(make(n_train), batch_size=args.batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(seed + 1), num_workers=0)
    val = DataLoader(make(n_val), batch_size=args.batch_size, shuffle=False, num_workers=0)
    return train, val


# ---------------------------------------------------------------------------
# Child helpers shared by --loop vectorized and --loop lifecycle
# ---------------------------------------------------------------------------


def _jsonable(value, depth: int = 0):
    """A JSON-friendly copy of ``value`` (enums by name, tensors as numbers, dataclasses as dicts)."""
    import dataclasses
    import enum

    import torch

    if depth > 6:
        return f"<{type(value).__name__}>"
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            return value.item()
        return [_jsonable(v, depth + 1) for v in value.detach().cpu().reshape(-1).tolist()]
    if isinstance(value, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "deque":
        return [_jsonable(v, depth + 1) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            if f.name in ("stage_entered_at", "captured_at", "timestamp", "stage_history"):
                continue  # wall-clock times
            out[f.name] = _jsonable(getattr(value, f.name), depth + 1)
        return out
    if type(value).__name__ in ("datetime", "date"):
        return "<time>"
    return f"<{type(value).__name__}>"


def _tensor_items(model):
    """(name, tensor) for every tensor in the state dict, the slot's duplicate names left out."""
    return [(k, v) for k, v in model.state_dict().items()
            if hasattr(v, "detach") and not k.startswith("host.slots.")]


def _digest(items) -> str:
    import hashlib

    import torch

    h = hashlib.sha1()
    for name, tensor in items:
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def _model_digests(model) -> dict:
    items = _tensor_items(model)
    seed = [(k, v) for k, v in items if k.startswith("seed_slot.")]
    host = [(k, v) for k, v in items if not k.startswith("seed_slot.")]
    return {"digest_host": _digest(host), "digest_seed": _digest(seed) if seed else None}


def _rng_digest() -> str:
    import hashlib

    import torch

    return hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()[:12]


def _clone_params(model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in _tensor_items(model)}


def _seed_fields(model, prefix: str) -> dict:
    """The slot's lifecycle state as the training layer exposes it."""
    state = model.seed_state
    out = {f"{prefix}stage": _stage_of(state), f"{prefix}live": bool(model.has_active_seed)}
    if state is None:
        return out
    m = state.metrics
    out.update({
        f"{prefix}seed_id": state.seed_id,
        f"{prefix}blueprint": state.blueprint_id,
        f"{prefix}alpha": _float(state.alpha),
        f"{prefix}blend_steps": [state.blending_steps_done, state.blending_steps_total],
        f"{prefix}epochs": [m.epochs_total, m.epochs_in_current_stage],
        f"{prefix}accs": [_float(m.initial_val_accuracy), _float(m.current_val_accuracy),
                          _float(m.best_val_accuracy), _float(m.accuracy_at_stage_start),
                          _float(m.accuracy_at_blending_start)],
        f"{prefix}cf": _float(m.counterfactual_contribution),
        f"{prefix}grad_ratio": _float(m.seed_gradient_norm_ratio),
        f"{prefix}isolate": bool(getattr(model.seed_slot, "isolate_gradients", False)),
    })
    return out


def _event_record(event) -> dict:
    return {
        "type": _jsonable(event.event_type),
        "seed_id": getattr(event, "seed_id", None),
        "epoch": getattr(event, "epoch", None),
        "data": _jsonable(dict(event.data or {})),
    }


def _inject_nan(model, kind: str = "nan", scale: float = 1000.0) -> str:
    """Corrupt the host (the governor's test input): ``nan`` sets one weight of the first host
    parameter to NaN; ``scale`` multiplies the output layer's weight by ``scale`` (a finite
    loss explosion, for loops that feed the loss to a policy before the governor acts)."""
    import torch

    named = dict(model.named_parameters())
    if kind == "scale":
        name = next((n for n in ("host.classifier.weight", "host.head.weight") if n in named),
                    [n for n in named if n.startswith("host.")][-1])
        with torch.no_grad():
            named[name].mul_(scale)
        return f"{name} *= {scale:g}"
    name = next(n for n in named if n.startswith("host."))
    with torch.no_grad():
        named[name].view(-1)[0] = float("nan")
    return f"{name}[0] = nan"


def synthetic_cifar_loaders(batch_size, train_batches, seed, shuffle_generator=None):
    """Learnable class-conditional CIFAR-shaped data (as ``--data synthetic``)."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(10, 3, 32, 32, generator=gen)

    def make(n):
        labels = torch.randint(0, 10, (n,), generator=gen)
        images = 0.5 * prototypes[labels] + torch.randn(n, 3, 32, 32, generator=gen)
        return TensorDataset(images, labels)

    n_train = batch_size * train_batches
    n_val = batch_size * max(1, train_batches // 2)
    if shuffle_generator is None:
        shuffle_generator = torch.Generator().manual_seed(seed + 1)
    train = DataLoader(make(n_train), batch_size=batch_size, shuffle=True, generator=shuffle_generator,
                       num_workers=0)
    val = DataLoader(make(n_val), batch_size=batch_size, shuffle=False, num_workers=0)
    return train, val


def synthetic_lm_loaders(batch_size, train_batches, seed, vocab, block):
    """Learnable token sequences: next = (5 * tok + 3) % vocab, 20% replaced by noise."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    gen = torch.Generator().manual_seed(seed)

    def make(n):
        cols = [torch.randint(0, vocab, (n, 1), generator=gen)]
        for _ in range(block):
            nxt = (cols[-1] * 5 + 3) % vocab
            noise = torch.rand(n, 1, generator=gen) < 0.2
            cols.append(torch.where(noise, torch.randint(0, vocab, (n, 1), generator=gen), nxt))
        seq = torch.cat(cols, 1)
        return TensorDataset(seq[:, :-1].contiguous(), seq[:, 1:].contiguous())

    train = DataLoader(make(batch_size * train_batches), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(seed + 1), num_workers=0)
    val = DataLoader(make(batch_size * max(1, train_batches // 2)), batch_size=batch_size, shuffle=False,
                     num_workers=0)
    return train, val


def _write_payload(args, modules, results, params) -> None:
    import torch

    payload = {"side": args.side, "modules": modules, "torch": torch.__version__, "results": results}
    Path(args.out).write_text(json.dumps(payload), encoding="utf-8")
    if params is not None:
        torch.save(params, args.out + ".params.pt")


# ---------------------------------------------------------------------------
# Child: --loop vectorized (esper.simic.vectorized.train_ppo_vectorized, observed)
# ---------------------------------------------------------------------------


def child_vectorized(args, modules) -> int:
    """Run ``train_ppo_vectorized`` on CPU and record per (batch, env, epoch) what it does.

    Observation only: subclasses/wrappers (installed in the names the function looks up at call
    time) read arguments and results and pass everything through unchanged. The one intended
    perturbation is ``--inject-nan-at``, which corrupts a host weight of env ``--inject-env``
    at the start of that epoch's training on both sides alike (to exercise the governor).
    """
    import importlib
    import random

    import torch

    vectorized = importlib.import_module("esper.simic.vectorized")
    tolaria = importlib.import_module("esper.tolaria")
    tamiyo = importlib.import_module("esper.tamiyo")
    nissa = importlib.import_module("esper.nissa")

    st: dict = {}

    def reset():
        st.clear()
        st.update(batch=-1, epoch=0, phase="done", next_env=0, env_of={}, models={}, records={},
                  events=[], updates=[], store_idx=0, injected=set(), action_enum=None, params={},
                  loader_calls=0)

    def rec(env, epoch=None):
        key = (st["batch"], env, st["epoch"] if epoch is None else epoch)
        record = st["records"].get(key)
        if record is None:
            record = {"batch": key[0], "env": env, "epoch": key[2]}
            st["records"][key] = record
        return record

    # -- data: the task's own mock loaders at --batch-size, or the synthetic set -------------
    real_get_task_spec = vectorized.get_task_spec

    def get_task_spec(name):
        spec = real_get_task_spec(name)
        st["action_enum"] = spec.action_enum
        real_factory = spec.dataloader_factory

        def factory(**params):
            env_idx = st["loader_calls"]
            st["loader_calls"] += 1
            if args.data == "mock":
                params.update(mock=True, batch_size=args.batch_size, num_workers=0)
                return real_factory(**params)
            return synthetic_cifar_loaders(args.batch_size, args.train_batches, st["seed"] + 7919 * env_idx,
                                           shuffle_generator=params.get("generator"))

        spec.dataloader_factory = factory
        return spec

    vectorized.get_task_spec = get_task_spec

    # -- models: env index by creation order (create_env_state makes env 0..n-1 in turn) -----
    real_create_model = tolaria.create_model

    def create_model(*a, **kw):
        model = real_create_model(*a, **kw)
        if st["phase"] != "init":  # first model of a new batch of environments
            st.update(batch=st["batch"] + 1, epoch=0, phase="init", next_env=0)
        env = st["next_env"]
        st["next_env"] += 1
        st["env_of"][id(model)] = env
        st["models"][(st["batch"], env)] = model
        bound_train = model.train

        def train(mode=True, _model=model, _env=env):
            if mode:
                if st["phase"] != "train":
                    st["phase"] = "train"
                    st["epoch"] += 1
                key = (st["batch"], _env)
                if (args.inject_nan_at is not None and st["epoch"] == args.inject_nan_at
                        and _env == args.inject_env and key not in st["injected"]):
                    st["injected"].add(key)
                    rec(_env)["nan_injected"] = _inject_nan(_model, args.inject_kind, args.inject_scale)
            return bound_train(mode)

        model.train = train
        rec(env)["created"] = True
        rec(env).update(_model_digests(model))
        return model

    tolaria.create_model = create_model

    def env_model(env):
        return st["models"][(st["batch"], env)]

    # -- governor --------------------------------------------------------------------------
    class RecordingGovernor(vectorized.TolariaGovernor):
        def _rec(self):
            return rec(st["env_of"].get(id(self.model)))

        def snapshot(self, *a, **kw):
            out = super().snapshot(*a, **kw)
            r = self._rec()
            r["gov_snapshots"] = r.get("gov_snapshots", 0) + 1
            return out

        def check_vital_signs(self, current_loss):
            panic = super().check_vital_signs(current_loss)
            r = self._rec()
            r.update(gov_loss=_float(current_loss), gov_panic=bool(panic),
                     gov_consecutive=int(self.consecutive_panics), gov_history=len(self.loss_history))
            return panic

        def execute_rollback(self, *a, **kw):
            report = super().execute_rollback(*a, **kw)
            r = self._rec()
            r["rollback"] = _jsonable(report)
            r.update(_seed_fields(self.model, "rb_"))
            r.update({"rb_" + k: v for k, v in _model_digests(self.model).items()})
            return report

    vectorized.TolariaGovernor = RecordingGovernor

    # -- signal tracker: one update per env per epoch, after validation and step_epoch -------
    class RecordingTracker(tamiyo.SignalTracker):
        def update(self, *a, **kw):
            signals = super().update(*a, **kw)
            env = self.env_id
            r = rec(env)
            metrics = signals.metrics
            r.update(
                train_loss=_float(kw.get("train_loss")), train_acc=_float(kw.get("train_accuracy")),
                val_loss=_float(kw.get("val_loss")), val_acc=_float(kw.get("val_accuracy")),
                plateau_epochs=int(metrics.plateau_epochs), host_stabilized=bool(metrics.host_stabilized),
                loss_delta=_float(metrics.loss_delta), acc_delta=_float(metrics.accuracy_delta),
                available_slots=kw.get("available_slots"),
            )
            model = env_model(env)
            r.update(_seed_fields(model, "seen_"))
            r.update({"pre_" + k: v for k, v in _model_digests(model).items()})
            r["rng_pre"] = _rng_digest()
            return signals

    tamiyo.SignalTracker = RecordingTracker

    # -- rewards ---------------------------------------------------------------------------
    def wrap_reward(fn, kind):
        def wrapped(*a, **kw):
            out = fn(*a, **kw)
            r = rec(st["store_idx"])
            r["reward_kind"] = kind
            r["reward_args"] = _jsonable({k: v for k, v in kw.items() if k != "return_components"})
            r["reward_fn"] = _float(out[0] if isinstance(out, tuple) else out)
            return out
        return wrapped

    vectorized.compute_contribution_reward = wrap_reward(vectorized.compute_contribution_reward, "contribution")
    vectorized.compute_shaped_reward = wrap_reward(vectorized.compute_shaped_reward, "shaped")

    class RecordingRewardNormalizer(vectorized.RewardNormalizer):
        def update_and_normalize(self, reward):
            out = super().update_and_normalize(reward)
            r = rec(st["store_idx"])
            r["reward"] = _float(reward)
            r["reward_normalized"] = _float(out)
            return out

    vectorized.RewardNormalizer = RecordingRewardNormalizer

    # -- agent: batched actions, transitions (after each env's action), PPO updates ------------
    class RecordingAgent(vectorized.PPOAgent):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            real = self.network.get_action_batch

            def get_action_batch(states, masks, deterministic=False):
                actions, log_probs, values = real(states, masks, deterministic=deterministic)
                st["phase"] = "action"
                st["store_idx"] = 0
                flat_values = values.reshape(-1)
                for i in range(states.shape[0]):
                    r = rec(i)
                    r["obs"] = [float(v) for v in states[i].tolist()]
                    r["mask"] = [float(v) for v in masks[i].tolist()]
                    r["action"] = st["action_enum"](int(actions[i])).name
                    r["log_prob"] = float(log_probs[i])
                    r["value"] = float(flat_values[i])
                return actions, log_probs, values

            self.network.get_action_batch = get_action_batch

        def store_transition(self, *a, **kw):
            env = st["store_idx"]
            r = rec(env)
            r["stored_reward"] = _float(a[4] if len(a) > 4 else kw.get("reward"))
            r["done"] = bool(a[5] if len(a) > 5 else kw.get("done"))
            r["bootstrap_value"] = _float(kw.get("bootstrap_value"))
            model = env_model(env)
            r.update(_seed_fields(model, "after_"))
            r.update(_model_digests(model))
            r["rng_after"] = _rng_digest()
            st["params"][f"{st['batch']}/{env}/{st['epoch']}"] = _clone_params(model)
            st["store_idx"] += 1
            return super().store_transition(*a, **kw)

        def update(self, *a, **kw):
            metrics = super().update(*a, **kw)
            st["updates"].append({"batch": st["batch"], **_jsonable(metrics)})
            return metrics

    vectorized.PPOAgent = RecordingAgent

    # -- telemetry: every event the hub sees, tagged with where the loop was -----------------
    class Recorder:
        def emit(self, event):
            entry = _event_record(event)
            env = entry["data"].get("env_id")
            entry.update(batch=st["batch"], loop_epoch=st["epoch"], phase=st["phase"])
            st["events"].append(entry)
            if isinstance(env, int) and st["batch"] >= 0:
                rec(env).setdefault("events", []).append(
                    f"{entry['type']}:{json.dumps(entry['data'], sort_keys=True)}")

        def close(self):
            pass

    nissa.get_hub().add_backend(Recorder())

    results, all_params = [], {}
    for seed in args.seeds:
        reset()
        st["seed"] = seed
        torch.manual_seed(seed)
        random.seed(seed)
        started = time.perf_counter()
        agent, history = vectorized.train_ppo_vectorized(
            n_episodes=args.episodes, n_envs=args.n_envs, max_epochs=args.epochs, device="cpu",
            devices=["cpu"], task=args.task, use_telemetry=True, seed=seed, num_workers=0,
        )
        elapsed = time.perf_counter() - started
        records = [st["records"][k] for k in sorted(st["records"])]
        results.append({
            "seed": seed,
            "seconds": elapsed,
            "model_class": next((f"{type(m).__module__}.{type(m).__qualname__}" for m in st["models"].values()), None),
            "epochs": records,
            "events": st["events"],
            "updates": st["updates"],
            "history": _jsonable(history),
            "final": {"agent_digest": _digest(list(agent.network.state_dict().items()))},
        })
        all_params[str(seed)] = st["params"]
        rollbacks = sum(1 for r in records if "rollback" in r)
        print(f"[{args.side}] seed {seed}: {len(records)} env-epochs in {elapsed:.1f}s, {rollbacks} rollbacks",
              file=sys.stderr, flush=True)
    _write_payload(args, modules, results, all_params)
    return 0


# ---------------------------------------------------------------------------
# Child: --loop lifecycle (a driver written here on the training layer's API only)
# ---------------------------------------------------------------------------

LIFECYCLE_BLUEPRINTS = {"cnn": ("conv_light", "attention", "norm", "depthwise"),
                        "transformer": ("lora", "attention", "norm")}


def child_lifecycle(args, modules) -> int:
    """A whole seed lifecycle driven through esper.tolaria / esper.kasmina / esper.runtime.

    Per epoch: train with the loop the seed's stage calls for (normal / incubator / blended),
    validate_and_get_metrics (per class), validate_with_attribution once a seed is live
    (its contribution and a fixed gradient ratio written into the seed's metrics, then
    record_accuracy), the governor's check on the val loss (rollback on panic, with fresh
    optimizers; a snapshot otherwise), seed_slot.step_epoch(), then a fixed policy: germinate
    the next blueprint at --germinate-at (again --regerminate-after epochs after a cull or a
    rollback), in PROBATIONARY fossilize (advance_stage(FOSSILIZED)) when the contribution is
    positive and cull otherwise, and cull a seed stuck --max-training-epochs in TRAINING.
    """
    import importlib
    import random

    import torch
    from torch import nn

    tolaria = importlib.import_module("esper.tolaria")
    runtime = importlib.import_module("esper.runtime")
    leyline = importlib.import_module("esper.leyline")
    host_mod = importlib.import_module("esper.kasmina.host")
    SeedStage = leyline.SeedStage
    device = "cpu"

    results, all_params = [], {}
    for seed in args.seeds:
        torch.manual_seed(seed)
        random.seed(seed)
        task_spec = runtime.get_task_spec(args.task)
        if task_spec.task_type == "lm":
            vocab, block = args.lm_vocab, args.block_size

            def factory(dev, _spec=task_spec):
                host = host_mod.TransformerHost(vocab_size=vocab, n_embd=args.lm_embd, n_head=2, n_layer=2,
                                                block_size=block, dropout=args.lm_dropout)
                return host_mod.MorphogeneticModel(host, device=dev, task_config=_spec.task_config)

            task_spec.model_factory = factory
            trainloader, testloader = synthetic_lm_loaders(args.batch_size, args.train_batches, seed, vocab, block)
            num_classes, random_guess = vocab, math.log(vocab)
        else:
            if args.data == "mock":
                trainloader, testloader = task_spec.create_dataloaders(mock=True, batch_size=args.batch_size,
                                                                       num_workers=0)
            else:
                trainloader, testloader = make_loaders(args, task_spec, seed)
            num_classes, random_guess = 10, None
        task_type = task_spec.task_type
        blueprints = LIFECYCLE_BLUEPRINTS[task_spec.topology]

        model = tolaria.create_model(task=task_spec, device=device)
        events: list = []
        model.seed_slot.on_telemetry = lambda event: events.append(_event_record(event))
        model.seed_slot.fast_mode = False
        criterion = nn.CrossEntropyLoss()

        def host_optimizer():
            return torch.optim.SGD(model.get_host_parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)

        host_opt, seed_opt = host_optimizer(), None
        governor = tolaria.TolariaGovernor(model, random_guess_loss=random_guess)
        germinated, next_germinate = 0, args.germinate_at
        records, params = [], {}
        started = time.perf_counter()
        for epoch in range(1, args.epochs + 1):
            r: dict = {"epoch": epoch}
            events.clear()
            if args.reseed_each_epoch:
                # Same global RNG state on both sides at every epoch start: later epochs compare
                # even where one side draws from torch's RNG a different number of times.
                torch.manual_seed(seed * 100003 + epoch)
            state = model.seed_state
            stage = state.stage if (state is not None and model.has_active_seed) else None
            if args.inject_nan_at == epoch:
                r["nan_injected"] = _inject_nan(model, args.inject_kind, args.inject_scale)
            if stage in (SeedStage.GERMINATED, SeedStage.TRAINING):
                r["trainer"] = "incubator"
                tolaria.train_epoch_incubator_mode(model, trainloader, criterion, host_opt, seed_opt, device, task_type)
            elif stage is not None:
                r["trainer"] = "blended"
                tolaria.train_epoch_blended(model, trainloader, criterion, host_opt, seed_opt, device, task_type)
            else:
                r["trainer"] = "normal"
                tolaria.train_epoch_normal(model, trainloader, criterion, host_opt, device, task_type)
            r["stage_train"] = stage.name if stage is not None else None
            r.update({"trained_" + k: v for k, v in _model_digests(model).items()})
            r["rng_train"] = _rng_digest()

            val_loss, val_acc, train_loss, train_acc, per_class, ppl = tolaria.validate_and_get_metrics(
                model, trainloader, testloader, criterion, device, compute_per_class=True,
                num_classes=num_classes, task_type=task_type)
            r.update(val_loss=_float(val_loss), val_acc=_float(val_acc), train_loss=_float(train_loss),
                     train_acc=_float(train_acc), perplexity=_float(ppl),
                     per_class_acc=None if per_class is None else [_float(per_class[k]) for k in sorted(per_class)])
            r["rng_val"] = _rng_digest()

            if model.has_active_seed:
                attr = tolaria.validate_with_attribution(model, testloader, criterion, device, task_type)
                r.update(attr_real_acc=_float(attr.real_accuracy), attr_baseline_acc=_float(attr.baseline_accuracy),
                         attr_contribution=_float(attr.seed_contribution), attr_real_loss=_float(attr.real_loss),
                         attr_baseline_loss=_float(attr.baseline_loss))
                r["rng_attr"] = _rng_digest()
                metrics = model.seed_state.metrics
                metrics.counterfactual_contribution = attr.seed_contribution
                metrics.seed_gradient_norm_ratio = args.grad_ratio
                metrics.record_accuracy(val_acc)

            panic = governor.check_vital_signs(val_loss)
            r.update(gov_panic=bool(panic), gov_consecutive=int(governor.consecutive_panics),
                     gov_history=len(governor.loss_history))
            if panic:
                report = governor.execute_rollback()
                r["rollback"] = _jsonable(report)
                r.update(_seed_fields(model, "rb_"))
                r.update({"rb_" + k: v for k, v in _model_digests(model).items()})
                host_opt, seed_opt = host_optimizer(), None  # momentum may hold the NaN
                next_germinate = max(next_germinate, epoch + args.regerminate_after)
            else:
                governor.snapshot()
                r["gov_snapshot"] = True

            model.seed_slot.step_epoch()
            r.update(_seed_fields(model, "step_"))

            action = "WAIT"
            state = model.seed_state
            if model.has_active_seed:
                if state.stage == SeedStage.PROBATIONARY:
                    contribution = state.metrics.counterfactual_contribution
                    if contribution is not None and contribution > 0:
                        gate = model.seed_slot.advance_stage(SeedStage.FOSSILIZED)
                        r["gate"] = _jsonable(gate)
                        action = "FOSSILIZE" if gate.passed else "FOSSILIZE_FAILED"
                        if gate.passed:
                            model.seed_slot.set_alpha(1.0)
                    else:
                        model.cull_seed()
                        action = "CULL"
                elif (state.stage in (SeedStage.GERMINATED, SeedStage.TRAINING)
                      and state.metrics.epochs_in_current_stage >= args.max_training_epochs):
                    model.cull_seed()
                    action = "CULL_STUCK"
                if action.startswith("CULL"):
                    seed_opt = None
                    next_germinate = epoch + args.regerminate_after
            elif epoch >= next_germinate:
                blueprint = blueprints[germinated % len(blueprints)]
                model.germinate_seed(blueprint, f"seed_{germinated}")
                germinated += 1
                seed_opt = torch.optim.SGD(model.get_seed_parameters(), lr=args.lr, momentum=0.9)
                action = f"GERMINATE_{blueprint}"
            r["action"] = action
            r.update(_seed_fields(model, "after_"))
            r.update(_model_digests(model))
            r["rng_after"] = _rng_digest()
            r["events"] = [f"{e['type']}:{json.dumps(e['data'], sort_keys=True)}" for e in events]
            records.append(r)
            params[str(epoch)] = _clone_params(model)
        elapsed = time.perf_counter() - started
        results.append({
            "seed": seed,
            "seconds": elapsed,
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "epochs": records,
            "final": {},
        })
        all_params[str(seed)] = params
        stages = sorted({r[k] for r in records for k in ("step_stage", "after_stage") if r.get(k)})
        print(f"[{args.side}] seed {seed}: {len(records)} epochs in {elapsed:.1f}s, stages {stages}, "
              f"{sum(1 for r in records if 'rollback' in r)} rollbacks", file=sys.stderr, flush=True)
    _write_payload(args, modules, results, all_params)
    return 0


# ---------------------------------------------------------------------------
# Parent: run both sides and compare
# ---------------------------------------------------------------------------


def side_env(side: str, esper_lite: Path) -> dict:
    env = dict(os.environ)
    paths = [str(PROJECT_ROOT)] if side == "fast" else []
    paths.append(str((esper_lite / "src").resolve()))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["OMP_NUM_THREADS"] = str(env.get("COMPAT_OMP_NUM_THREADS", "1"))
    return env


def _close(a, b, atol, rtol) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, list) or isinstance(b, list):
        if not (isinstance(a, list) and isinstance(b, list)) or len(a) != len(b):
            return False
        return all(_close(x, y, atol, rtol) for x, y in zip(a, b))
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= atol + rtol * abs(b)


def _maxdiff(a, b) -> float:
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return max((_maxdiff(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b)
    return 0.0 if a == b else math.inf


def _fmt(value) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return f"[{len(value)} values]"
    return str(value)


def epoch_row(record) -> str:
    def num(key, fmt):
        value = record.get(key)
        return "-" if value is None else format(value, fmt)

    return (f"{record.get('epoch', '?'):>3}  {num('val_acc', '7.3f')}  {num('val_loss', '8.5f')}  "
            f"{str(record.get('stage_seen')):>12}  {str(record.get('action')):>24}  "
            f"{str(record.get('stage_after')):>12}  {num('reward', '8.4f')}")


EPOCH_HEADER = (f"{'ep':>3}  {'val_acc':>7}  {'val_loss':>8}  {'stage_seen':>12}  {'action':>24}  "
                f"{'stage_after':>12}  {'reward':>8}")


def compare_seed(a: dict, b: dict, names, atol: float, rtol: float, context: int = 2) -> tuple[bool, str]:
    """Compare one seed's two records; (same, report)."""
    ea, eb = a["epochs"], b["epochs"]
    lines = []
    maxdiff = {}
    first = None
    for i in range(max(len(ea), len(eb))):
        if i >= len(ea) or i >= len(eb):
            first = first or (i, "epochs", len(ea), len(eb))
            break
        ra, rb = ea[i], eb[i]
        for field in DISCRETE_FIELDS:
            if ra.get(field) != rb.get(field) and first is None:
                first = (i, field, ra.get(field), rb.get(field))
        for field in FLOAT_FIELDS:
            va, vb = ra.get(field), rb.get(field)
            if va is None and vb is None:
                continue
            maxdiff[field] = max(maxdiff.get(field, 0.0), _maxdiff(va, vb))
            if not _close(va, vb, atol, rtol) and first is None:
                first = (i, field, va, vb)
    fa, fb = a["final"], b["final"]
    final_same = (fa["action_counts"] == fb["action_counts"]
                  and _close(fa["val_acc"], fb["val_acc"], atol, rtol)
                  and _close(fa["rewards"], fb["rewards"], atol, rtol))
    diffs = ", ".join(f"{k}={v:.3g}" for k, v in sorted(maxdiff.items()) if v)
    if first is None and final_same:
        exact = not diffs
        lines.append(f"identical over {len(ea)} epochs" + ("" if exact else f" (within tolerance; max |diff|: {diffs})")
                     + f"; final acc {fa['val_acc']:.3f}, actions {dict((k, v) for k, v in fa['action_counts'].items() if v)}")
        return True, "\n".join(lines)
    if first is None:
        lines.append(f"epochs agree but the result tuple differs: {names[0]}={fa} {names[1]}={fb}")
        return False, "\n".join(lines)
    i, field, va, vb = first
    epoch = ea[i]["epoch"] if i < len(ea) else (eb[i]["epoch"] if i < len(eb) else i + 1)
    detail = ""
    if isinstance(va, list) and isinstance(vb, list) and len(va) == len(vb):
        idx = [k for k, (x, y) in enumerate(zip(va, vb)) if not _close(x, y, atol, rtol)]
        detail = f" (entries {idx[:8]}: " + ", ".join(f"{_fmt(va[k])} vs {_fmt(vb[k])}" for k in idx[:4]) + ")"
    lines.append(f"FIRST DIVERGENCE at epoch {epoch}, field {field}: {names[0]}={_fmt(va)} {names[1]}={_fmt(vb)}{detail}")
    if diffs:
        lines.append(f"  max |diff| over the run: {diffs}")
    lines.append("  " + EPOCH_HEADER)
    for j in range(max(0, i - context), min(max(len(ea), len(eb)), i + context + 1)):
        for name, records in zip(names, (ea, eb)):
            if j < len(records):
                lines.append(f"  {epoch_row(records[j])}   <- {name}")
    return False, "\n".join(lines)


# ---------------------------------------------------------------------------
# Parent: compare --loop vectorized / lifecycle records
# ---------------------------------------------------------------------------

# Lifecycle fields that are losses: esper_fast computes the validation loss with a fused kernel,
# so these are compared within --loss-rtol and reported as max |diff|, not bitwise.
LIFECYCLE_LOSS_FIELDS = frozenset({
    "train_loss", "val_loss", "attr_real_loss", "attr_baseline_loss", "perplexity",
    "rollback.loss_at_panic", "rollback.loss_threshold",
})


def _flatten(record: dict) -> dict:
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            for sub, subvalue in value.items():
                out[f"{key}.{sub}"] = subvalue
        else:
            out[key] = value
    return out


def _record_key(record: dict) -> tuple:
    if "batch" in record:
        return (record["batch"], record["env"], record["epoch"])
    return (record["epoch"],)


def _key_str(key: tuple) -> str:
    return "/".join(str(k) for k in key)


def _same(a, b) -> bool:
    """Exact equality, NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _diffs(a, b) -> tuple[float, float]:
    """(max abs, max rel) difference of two numbers or equal-length lists; inf when incomparable."""
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        pairs = [_diffs(x, y) for x, y in zip(a, b)]
        return (max((p[0] for p in pairs), default=0.0), max((p[1] for p in pairs), default=0.0))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if math.isnan(a) or math.isnan(b):
            return (0.0, 0.0) if (math.isnan(a) and math.isnan(b)) else (math.inf, math.inf)
        if a == b:
            return 0.0, 0.0
        d = abs(a - b)
        return d, d / max(abs(a), abs(b))
    return (0.0, 0.0) if a == b else (math.inf, math.inf)


def generic_row(record: dict) -> str:
    def num(key, fmt):
        value = record.get(key)
        return "-" if value is None else format(value, fmt)

    seen = record.get("seen_stage", record.get("stage_train"))
    flags = "".join(flag for flag, on in (("N", "nan_injected" in record), ("P", record.get("gov_panic")),
                                          ("R", "rollback" in record)) if on)
    return (f"{_key_str(_record_key(record)):>9}  {str(seen):>12}  {str(record.get('action')):>22}  "
            f"{str(record.get('after_stage')):>12}  {num('after_alpha', '6.4f')}  {num('val_acc', '7.3f')}  "
            f"{num('val_loss', '10.7f')}  {flags:>3}  {str(record.get('digest_host'))[:8]}")


GENERIC_HEADER = (f"{'key':>9}  {'stage_seen':>12}  {'action':>22}  {'stage_after':>12}  {'alpha':>6}  "
                  f"{'val_acc':>7}  {'val_loss':>10}  {'flg':>3}  digest")


def _param_magnitude(params_a, params_b, key: str):
    """(max abs diff, max rel diff, tensor name) between two saved parameter sets."""
    if params_a is None or params_b is None or key not in params_a or key not in params_b:
        return None
    pa, pb = params_a[key], params_b[key]
    worst = (0.0, 0.0, None)
    for name in sorted(set(pa) | set(pb)):
        if name not in pa or name not in pb or pa[name].shape != pb[name].shape:
            return (math.inf, math.inf, name)
        ta, tb = pa[name].double(), pb[name].double()
        d = (ta - tb).abs()
        d = d.nan_to_num(nan=0.0) if bool((ta.isnan() == tb.isnan()).all()) else d.nan_to_num(nan=math.inf)
        dmax = float(d.max()) if d.numel() else 0.0
        if dmax > worst[0]:
            scale = float(ta.abs().nan_to_num(nan=0.0).max()) or 1.0
            worst = (dmax, dmax / scale, name)
    return worst


def coverage(records, name) -> str:
    """What a run exercised: stages seen, actions taken, governor activity."""
    from collections import Counter

    stages = {r[k] for r in records for k in ("seen_stage", "step_stage", "after_stage") if r.get(k)}
    actions = Counter(r["action"] for r in records if r.get("action"))
    rollbacks = [_key_str(_record_key(r)) for r in records if "rollback" in r]
    panics = sum(1 for r in records if r.get("gov_panic"))
    cf = sum(1 for r in records if r.get("reward_kind") == "contribution" or "attr_contribution" in r)
    return (f"  [{name}] coverage: stages {sorted(stages)}; actions {dict(sorted(actions.items()))}; "
            f"panics {panics}; rollbacks {len(rollbacks)}{' at ' + ','.join(rollbacks[:8]) if rollbacks else ''}; "
            f"records with a counterfactual {cf}")


def compare_generic(a: dict, b: dict, names, loss_fields, loss_rtol: float, params=(None, None),
                    context: int = 2) -> tuple[bool, str]:
    """Compare one seed's vectorized/lifecycle records; (same, report)."""
    ra = {_record_key(r): _flatten(r) for r in a["epochs"]}
    rb = {_record_key(r): _flatten(r) for r in b["epochs"]}
    keys = sorted(set(ra) | set(rb))
    lines = []
    first = None  # (key, field, va, vb)
    first_param = None
    loss_max: dict = {}
    loss_first_exceed = None
    first_by_field: dict = {}
    for key in keys:
        if key not in ra or key not in rb:
            first = first or (key, "record", key in ra, key in rb)
            continue
        x, y = ra[key], rb[key]
        for field in sorted(set(x) | set(y)):
            va, vb = x.get(field), y.get(field)
            if field in loss_fields:
                absd, reld = _diffs(va, vb)
                old = loss_max.get(field, (0.0, 0.0))
                loss_max[field] = (max(old[0], absd), max(old[1], reld))
                if reld > loss_rtol and loss_first_exceed is None:
                    loss_first_exceed = (key, field, va, vb)
                continue
            if _same(va, vb):
                continue
            if "digest" in field and first_param is None:
                first_param = (key, field, va, vb)
            if first is None:
                first = (key, field, va, vb)
            first_by_field.setdefault(field, key)
    extra = []
    for name in ("events", "updates", "history", "final"):
        if name in a or name in b:
            sa, sb = a.get(name), b.get(name)
            if not _same(json.loads(json.dumps(sa)), json.loads(json.dumps(sb))):
                detail = ""
                if isinstance(sa, list) and isinstance(sb, list):
                    idx = next((i for i, (p, q) in enumerate(zip(sa, sb)) if p != q), min(len(sa), len(sb)))
                    detail = (f" (first at entry {idx} of {len(sa)}/{len(sb)}: "
                              f"{json.dumps(sa[idx])[:300] if idx < len(sa) else '-'} vs "
                              f"{json.dumps(sb[idx])[:300] if idx < len(sb) else '-'})")
                extra.append(f"{name} differ{detail}")

    losses = ", ".join(f"{k}: abs {v[0]:.3g} rel {v[1]:.3g}" for k, v in sorted(loss_max.items()))
    lines.append(coverage(a["epochs"], names[0]))
    if first is None and not extra and loss_first_exceed is None:
        lines.append(f"identical over {len(keys)} records"
                     + (f" (losses within rtol {loss_rtol:g}; max diff {losses})" if losses else "")
                     + "; parameters bitwise identical at every record")
        return True, "\n".join(lines)
    if first is not None:
        key, field, va, vb = first
        lines.append(f"FIRST DIVERGENCE at {_key_str(key)}, field {field}: "
                     f"{names[0]}={json.dumps(va)[:300]} {names[1]}={json.dumps(vb)[:300]}")
        idx = keys.index(key)
        lines.append("  " + GENERIC_HEADER)
        for j in range(max(0, idx - context), min(len(keys), idx + context + 1)):
            for name, records in zip(names, (ra, rb)):
                if keys[j] in records:
                    lines.append(f"  {generic_row(records[keys[j]])}   <- {name}")
    else:
        lines.append(f"records agree on every exact field over {len(keys)} records")
    if len(first_by_field) > 1:
        ordered = sorted(first_by_field.items(), key=lambda kv: (kv[1], kv[0]))
        lines.append("  fields that differ (first record): "
                     + ", ".join(f"{f}@{_key_str(k)}" for f, k in ordered[:24])
                     + (f" (+{len(ordered) - 24} more)" if len(ordered) > 24 else ""))
    if first_param is not None:
        key, field, va, vb = first_param
        mag = _param_magnitude(params[0], params[1], _key_str(key))
        how = f"; max |diff| {mag[0]:.3g} (rel {mag[1]:.3g}) in {mag[2]}" if mag else ""
        lines.append(f"  first parameter difference at {_key_str(key)} ({field}){how}")
    elif first is not None:
        lines.append("  parameters bitwise identical at every record")
    if loss_first_exceed is not None:
        key, field, va, vb = loss_first_exceed
        lines.append(f"  first loss beyond rtol {loss_rtol:g} at {_key_str(key)}, {field}: {va!r} vs {vb!r}")
    if losses:
        lines.append(f"  losses max diff: {losses}")
    lines.extend("  " + e for e in extra)
    return False, "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Run esper-lite episodes on esper-lite and on esper_fast and compare them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring for what is recorded and compared.",
    )
    parser.add_argument("--esper-lite", type=Path, required=True, help="esper-lite checkout (with src/esper)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--task", choices=("cifar10", "tinystories"), default="cifar10")
    parser.add_argument("--loop", choices=("heuristic", "ppo", "vectorized", "lifecycle"), default="heuristic")
    parser.add_argument("--data", choices=("mock", "synthetic"), default="mock")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-batches", type=int, default=None, help="heuristic loop: batches per epoch")
    parser.add_argument("--train-batches", type=int, default=8, help="--data synthetic: train batches")
    parser.add_argument("--block-size", type=int, default=32, help="tinystories mock: sequence length")
    parser.add_argument("--lm-samples", type=int, default=16, help="tinystories mock: sequences per split")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per subprocess")
    vec = parser.add_argument_group("--loop vectorized")
    vec.add_argument("--n-envs", type=int, default=2, help="parallel environments")
    vec.add_argument("--episodes", type=int, default=4, help="n_episodes (batches of --n-envs episodes)")
    vec.add_argument("--inject-env", type=int, default=0, help="env whose weight --inject-nan-at corrupts")
    life = parser.add_argument_group("--loop lifecycle (and --inject-nan-at for vectorized)")
    life.add_argument("--inject-nan-at", type=int, default=None,
                      help="epoch at whose start a host weight is set to NaN (governor rollback)")
    life.add_argument("--inject-kind", choices=("nan", "scale"), default="nan",
                      help="nan: one host weight := NaN; scale: output weight *= --inject-scale")
    life.add_argument("--inject-scale", type=float, default=1000.0)
    life.add_argument("--germinate-at", type=int, default=5, help="epoch of the first germination")
    life.add_argument("--regerminate-after", type=int, default=2, help="epochs after a cull/rollback")
    life.add_argument("--max-training-epochs", type=int, default=12, help="cull a seed stuck this long")
    life.add_argument("--grad-ratio", type=float, default=1.0, help="seed_gradient_norm_ratio written (G2)")
    life.add_argument("--lr", type=float, default=0.01)
    life.add_argument("--reseed-each-epoch", action="store_true",
                      help="lifecycle: torch.manual_seed(seed * 100003 + epoch) at each epoch start")
    life.add_argument("--lm-vocab", type=int, default=64, help="tinystories: vocabulary of the small host")
    life.add_argument("--lm-dropout", type=float, default=0.1, help="tinystories: dropout of the small host")
    life.add_argument("--lm-embd", type=int, default=32, help="tinystories: width of the small host")
    life.add_argument("--loss-rtol", type=float, default=1e-5,
                      help="lifecycle: relative tolerance for loss fields (fused validation loss)")
    parser.add_argument("--params-out", type=Path, default=None,
                        help="vectorized/lifecycle: keep each side's per-epoch parameter file here")
    parser.add_argument("--sides", nargs="+", choices=("original", "fast"), default=["original", "fast"])
    parser.add_argument("--serial", action="store_true", help="run the sides one after the other")
    parser.add_argument("--atol", type=float, default=0.0)
    parser.add_argument("--rtol", type=float, default=0.0)
    parser.add_argument("--json", type=Path, default=None, help="save both sides' records here")
    parser.add_argument("--show", action="store_true", help="print each side's per-epoch table")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per subprocess")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the subprocesses")
    parser.add_argument("--side", choices=("original", "fast"), help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.side is not None:
        return child_main(args)
    tmp = Path(tempfile.mkdtemp(prefix="compat_episodes_"))
    try:
        return run_sides(args, parser, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_sides(args, parser, tmp: Path) -> int:
    """Parent: start the subprocesses (logs and records under ``tmp``), then compare."""

    esper_lite = args.esper_lite.resolve()
    if not (esper_lite / "src" / "esper" / "simic" / "training.py").exists():
        parser.error(f"{esper_lite} does not look like an esper-lite checkout (src/esper/simic/training.py)")
    if len(args.sides) > 2:
        parser.error("--sides takes one or two sides")

    forward = [
        "--esper-lite", str(esper_lite), "--seeds", *map(str, args.seeds), "--epochs", str(args.epochs),
        "--task", args.task, "--loop", args.loop, "--data", args.data, "--batch-size", str(args.batch_size),
        "--train-batches", str(args.train_batches), "--block-size", str(args.block_size),
        "--lm-samples", str(args.lm_samples), "--threads", str(args.threads),
        "--n-envs", str(args.n_envs), "--episodes", str(args.episodes), "--inject-env", str(args.inject_env),
        "--germinate-at", str(args.germinate_at), "--regerminate-after", str(args.regerminate_after),
        "--max-training-epochs", str(args.max_training_epochs), "--grad-ratio", repr(args.grad_ratio),
        "--lr", repr(args.lr), "--lm-vocab", str(args.lm_vocab), "--lm-embd", str(args.lm_embd),
        "--lm-dropout", repr(args.lm_dropout),
    ]
    if args.reseed_each_epoch:
        forward.append("--reseed-each-epoch")
    if args.inject_nan_at is not None:
        forward += ["--inject-nan-at", str(args.inject_nan_at), "--inject-kind", args.inject_kind,
                    "--inject-scale", repr(args.inject_scale)]
    if args.max_batches is not None:
        forward += ["--max-batches", str(args.max_batches)]
    names = [f"{side}{'#' + str(k + 1) if args.sides.count(side) > 1 else ''}" for k, side in enumerate(args.sides)]
    jobs = []
    print(f"compat_episodes: loop={args.loop} task={args.task} data={args.data} batch_size={args.batch_size} "
          f"max_batches={args.max_batches} epochs={args.epochs} seeds={args.seeds} sides={names}", flush=True)
    started = time.perf_counter()
    for name, side in zip(names, args.sides):
        out = tmp / f"{name}.json"
        log = open(tmp / f"{name}.log", "w+", encoding="utf-8")
        cmd = [args.python, str(Path(__file__).resolve()), *forward, "--side", side, "--out", str(out)]
        proc = subprocess.Popen(cmd, env=side_env(side, esper_lite), stdout=log, stderr=subprocess.STDOUT,
                                cwd=tmp)
        jobs.append((name, proc, out, log))
        if args.serial:
            _wait(proc, args.timeout)
    payloads, failed = {}, False
    for name, proc, out, log in jobs:
        rc = _wait(proc, args.timeout)
        log.seek(0)
        text = log.read()
        log.close()
        if rc != 0 or not out.exists():
            failed = True
            tail = "\n".join(text.strip().splitlines()[-15:])
            print(f"\n[{name}] FAILED (exit {rc}); last lines of its output:\n{tail}")
            continue
        payloads[name] = json.loads(out.read_text(encoding="utf-8"))
        for res in payloads[name]["results"]:
            print(f"[{name}] seed {res['seed']}: {len(res['epochs'])} {'records' if args.loop == 'vectorized' else 'epochs'}"
                  f" in {res['seconds']:.1f}s")
    print(f"compat_episodes: wall time {time.perf_counter() - started:.1f}s")

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payloads, indent=1), encoding="utf-8")
        print(f"compat_episodes: records saved to {args.json}")
    generic = args.loop in ("vectorized", "lifecycle")
    params = {}
    if generic:
        for name, _proc, out, _log in jobs:
            pfile = Path(str(out) + ".params.pt")
            if pfile.exists():
                if args.params_out is not None:
                    args.params_out.mkdir(parents=True, exist_ok=True)
                    shutil.copy(pfile, args.params_out / f"{args.loop}_{name}.params.pt")
                try:
                    import torch

                    params[name] = torch.load(pfile, weights_only=True)
                except Exception as exc:  # pragma: no cover - parent without torch
                    print(f"compat_episodes: cannot load {pfile.name} ({exc}); no parameter magnitudes")
    if args.show:
        for name, payload in payloads.items():
            for res in payload["results"]:
                print(f"\n[{name}] seed {res['seed']}\n{GENERIC_HEADER if generic else EPOCH_HEADER}")
                for record in res["epochs"]:
                    print(generic_row(record) if generic else epoch_row(record))
    if failed:
        return 2
    if len(payloads) < 2:
        return 0

    (na, pa), (nb, pb) = payloads.items()
    for side_name, payload in ((na, pa), (nb, pb)):
        mapped = payload["modules"]
        model_class = payload["results"][0].get("model_class") if payload["results"] else None
        print(f"[{side_name}] model {model_class}; esper.kasmina from {mapped.get('kasmina')}; "
              f"esper.simic from {mapped.get('simic')}")
    all_same = True
    by_seed_b = {r["seed"]: r for r in pb["results"]}
    print()
    for res_a in pa["results"]:
        res_b = by_seed_b.get(res_a["seed"])
        if res_b is None:
            print(f"seed {res_a['seed']}: missing on {nb}")
            all_same = False
            continue
        if generic:
            seed_params = tuple(params.get(n, {}).get(str(res_a["seed"])) for n in (na, nb))
            loss_fields = LIFECYCLE_LOSS_FIELDS if args.loop == "lifecycle" else frozenset()
            same, report = compare_generic(res_a, res_b, (na, nb), loss_fields, args.loss_rtol, seed_params)
        else:
            same, report = compare_seed(res_a, res_b, (na, nb), args.atol, args.rtol)
        all_same &= same
        print(f"seed {res_a['seed']}: {report}")
    return 0 if all_same else 1


def _wait(proc, timeout):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return 124


if __name__ == "__main__":
    sys.exit(main())
