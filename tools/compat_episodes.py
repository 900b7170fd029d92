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

Usage
-----
Run it with an interpreter that has torch, pyyaml and pydantic (esper-lite's nissa needs
them) and esper_fast::

    python tools/compat_episodes.py --esper-lite /tmp/esper-lite --seeds 1 2 3 --epochs 40
    python tools/compat_episodes.py --esper-lite /tmp/esper-lite --loop ppo --seeds 1 --epochs 25
    python tools/compat_episodes.py --esper-lite /tmp/esper-lite --sides original original  # determinism check
    python tools/compat_episodes.py --esper-lite /tmp/esper-lite --sides original --show    # one side, print epochs

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
    parser.add_argument("--loop", choices=("heuristic", "ppo"), default="heuristic")
    parser.add_argument("--data", choices=("mock", "synthetic"), default="mock")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-batches", type=int, default=None, help="heuristic loop: batches per epoch")
    parser.add_argument("--train-batches", type=int, default=8, help="--data synthetic: train batches")
    parser.add_argument("--block-size", type=int, default=32, help="tinystories mock: sequence length")
    parser.add_argument("--lm-samples", type=int, default=16, help="tinystories mock: sequences per split")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per subprocess")
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
    ]
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
            print(f"[{name}] seed {res['seed']}: {len(res['epochs'])} epochs in {res['seconds']:.1f}s")
    print(f"compat_episodes: wall time {time.perf_counter() - started:.1f}s")

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payloads, indent=1), encoding="utf-8")
        print(f"compat_episodes: records saved to {args.json}")
    if args.show:
        for name, payload in payloads.items():
            for res in payload["results"]:
                print(f"\n[{name}] seed {res['seed']}\n{EPOCH_HEADER}")
                for record in res["epochs"]:
                    print(epoch_row(record))
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
