"""What a data-parallel run pays for agreeing, and how one epoch scales from 1 to 2 processes.

Run: ``python benchmarks/bench_distributed.py`` (CPU, gloo, 2 processes; about a minute),
``--backend nccl`` on a GPU machine (2 GPUs or more: 2 processes; one GPU: a process group
of one, which times the collective's fixed cost only), ``--json FILE`` for the numbers.

1. ``validation all-reduce``: ``esper_fast.tolaria.distributed.reduce_results`` on the three
   passes of ``validate_epoch`` (validation with 10 per-class counts, train metrics,
   counterfactual): the one collective a validation call adds, timed alone, against the
   one-process read it replaces (``MetricsAccumulator.compute_all``).
2. ``stop agreement``: the all-reduce of one int on the CPU that ``esper-fast train`` makes
   before every training step so that all ranks stop after the same step.
3. ``rollback``: the governor's restore from each rank's own host snapshot (what the run
   does) against the alternative that keeps the snapshot on rank 0 only: rank 0 restores,
   then broadcasts the model's state (one flat buffer) to the others.
4. ``epoch``: ``esper-fast train`` on cifar10 with ``--nproc 1`` and ``--nproc 2`` (each
   process takes ``--batch-size`` samples per step, so 2 processes do twice the samples per
   epoch) and one process limited to one thread, from the runs' own ``metrics.jsonl``.

Not a pytest-benchmark module: each part needs its own processes (``CASES`` is empty, so
``gpu_report.py`` times nothing here; the GPU check runs this script as its own step). Medians
over ``--rounds`` calls, with the 10th and 90th percentiles. The report names the
``esper_fast`` each rank imported (``esper_fast_files``): the in-place build of this checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
# The ranks are spawned with this process's sys.path: the checkout's esper_fast, installed or not.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
CLOCK = time.perf_counter
CASES: list = []  # timed by its own processes, not by gpu_report.py


def _spread(samples: list[float]) -> dict:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"median_us": 1e6 * statistics.median(ordered), "p10_us": 1e6 * pick(0.1), "p90_us": 1e6 * pick(0.9),
            "rounds": len(ordered)}


def _timed(fn, rounds: int, device: str, barrier=None) -> dict:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(rounds):
        if barrier is not None:
            barrier()  # every rank starts the call together: the time is the collective's, not the skew's
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = CLOCK()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        samples.append(CLOCK() - start)
    return _spread(samples)


def _accumulators(device: str):
    from esper_fast.ops.metrics import MetricsAccumulator

    g = torch.Generator().manual_seed(0)
    passes = []
    for per_class in (True, False, False):  # validation, train metrics, counterfactual
        acc = MetricsAccumulator(10, device, per_class=per_class)
        logits = torch.randn(128, 10, generator=g).to(device)
        acc.update(logits, torch.randint(0, 10, (128,), generator=g).to(device))
        passes.append(acc)
    return passes, [10, 0, 0]


def _model_state(task: str, device: str):
    from esper_fast.tolaria import TolariaGovernor, create_model

    torch.manual_seed(0)
    model = create_model(task, device)
    governor = TolariaGovernor(model)
    return model, governor


def _collectives(rank: int, world: int, backend: str, init: str, rounds: int, out: str) -> None:
    import esper_fast
    from esper_fast.ops.metrics import MetricsAccumulator
    from esper_fast.tolaria.distributed import reduce_results

    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        group = dist.group.WORLD
        barrier = dist.barrier
        found = {}
        passes, widths = _accumulators(device)
        found["validation all-reduce"] = _timed(lambda: reduce_results(passes, widths, group), rounds, device, barrier)
        found["one-process read (compute_all)"] = _timed(lambda: MetricsAccumulator.compute_all(passes), rounds, device)
        control = dist.new_group(backend="gloo") if backend == "nccl" else group
        flag = torch.zeros(1, dtype=torch.int64)
        found["stop agreement (1 int, gloo)"] = _timed(
            lambda: dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=control), rounds, "cpu", barrier)
        for task in ("cifar10", "tinystories"):
            model, governor = _model_state(task, device)
            state = [t for t in model.state_dict().values() if isinstance(t, torch.Tensor)]
            flat = torch.cat([t.detach().reshape(-1).float() for t in state])

            def local_restore():
                governor._model_snapshot.restore(model.state_dict(keep_vars=True))

            def restore_and_broadcast():
                if rank == 0:
                    local_restore()
                dist.broadcast(flat, src=0, group=group)

            few = max(3, rounds // 10)
            found[f"rollback {task}: own snapshot, local restore"] = _timed(local_restore, few, device, barrier)
            found[f"rollback {task}: rank 0's snapshot + broadcast"] = _timed(restore_and_broadcast, few, device, barrier)
            found[f"rollback {task}: snapshot bytes per rank"] = {"bytes": governor._model_snapshot.nbytes}
        with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
            json.dump({"esper_fast": esper_fast.__file__, "results": found}, handle)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def collectives(backend: str, rounds: int) -> dict:
    world = 2 if backend == "gloo" else min(2, max(1, torch.cuda.device_count()))
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_collectives, args=(world, backend, os.path.join(tmp, "init"), rounds, tmp), nprocs=world, join=True)
        written = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    ranks = [w["results"] for w in written]
    # A collective takes as long as its slowest rank.
    merged = {}
    for name in ranks[0]:
        if "bytes" in ranks[0][name]:
            merged[name] = ranks[0][name]
        else:
            merged[name] = max((r[name] for r in ranks), key=lambda s: s["median_us"])
    return {"world_size": world, "backend": backend, "results": merged,
            "esper_fast_files": [w["esper_fast"] for w in written]}


def _epoch_run(workdir: Path, nproc: int, threads: int | None, args) -> dict:
    out = workdir / f"nproc{nproc}-threads{threads or 'all'}"
    env = {k: v for k, v in os.environ.items() if k not in ("ESPER_FAST_REFERENCE", "ESPER_FAST_SELF_SIGNAL")}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "esper_fast", "train", "--task", "cifar10", "--device", args.device,
               "--epochs", str(args.epochs), "--max-batches", str(args.max_batches), "--batch-size", str(args.batch_size),
               "--no-progress", "--out", str(out), "--nproc", str(nproc)]
    start = CLOCK()
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    wall = CLOCK() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["type"] == "epoch"][1:]  # the first epoch pays one-off costs
    mean = lambda key: statistics.mean(r[key] for r in epochs)  # noqa: E731
    return {
        # --nproc N sets OMP_NUM_THREADS to cores // N unless it is set.
        "processes": nproc, "threads_per_process": threads or (torch.get_num_threads() if nproc == 1
                                                                 else max(1, (os.cpu_count() or 1) // nproc)),
        "train_s": mean("train_time_s"), "eval_s": mean("eval_time_s"), "epoch_s": mean("epoch_time_s"),
        "samples_per_s": mean("samples_per_s"), "samples_per_epoch": nproc * args.max_batches * args.batch_size,
        "command_wall_s": wall,
    }


def epochs(args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        runs = [_epoch_run(workdir, 1, None, args), _epoch_run(workdir, 1, 1, args), _epoch_run(workdir, 2, None, args)]
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    parser.add_argument("--rounds", type=int, default=200, help="calls timed per collective (default 200)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is left out (default 3)")
    parser.add_argument("--max-batches", type=int, default=20, help="training steps per epoch and process (default 20)")
    parser.add_argument("--batch-size", type=int, default=64, help="per process (default 64)")
    parser.add_argument("--skip-epochs", action="store_true", help="only the collectives")
    parser.add_argument("--json", metavar="FILE", help="also write the numbers here")
    args = parser.parse_args(argv)
    if args.backend == "nccl" and not torch.cuda.is_available():
        parser.error("--backend nccl needs CUDA")
    args.device = "cuda" if args.backend == "nccl" else "cpu"

    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    report["collectives"] = found = collectives(args.backend, args.rounds)
    print(f"collectives: {found['world_size']} process(es), {found['backend']}, {report['machine']}, torch {report['torch']}"
          + (f", {report['gpu']}" if report["gpu"] else ""))
    print(f"  {'what':<58} {'median':>10} {'p10':>10} {'p90':>10}")
    for name, value in found["results"].items():
        if "bytes" in value:
            print(f"  {name:<58} {value['bytes'] / 2**10:8.0f} KiB")
        else:
            print(f"  {name:<58} {value['median_us']:8.0f}us {value['p10_us']:8.0f}us {value['p90_us']:8.0f}us")

    can_scale = args.backend == "gloo" or torch.cuda.device_count() >= 2
    if not args.skip_epochs and can_scale:
        report["epochs"] = runs = epochs(args)
        base = runs[0]["samples_per_s"]
        print(f"epoch: cifar10 on {args.device}, {args.max_batches} steps of {args.batch_size} per process, "
              f"mean of epochs 2-{args.epochs}")
        print(f"  {'processes x threads':<22} {'train s':>8} {'eval s':>8} {'epoch s':>8} {'samples/s':>10} {'vs 1 proc':>9}")
        for run in runs:
            print(f"  {run['processes']} x {run['threads_per_process']:<18} {run['train_s']:8.2f} {run['eval_s']:8.2f} "
                  f"{run['epoch_s']:8.2f} {run['samples_per_s']:10.0f} {run['samples_per_s'] / base:8.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
