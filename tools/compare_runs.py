"""Compares two ``esper-fast train`` run folders: whether they hold the same run.

    python tools/compare_runs.py RUN_A RUN_B [--console A.out B.out]

What must match, and what may differ:

- ``metrics.jsonl``: line for line the same bytes once the volatile values are masked
  (wall-clock times, durations, throughput, the host name and the run folder's path);
  key order included;
- every checkpoint in ``checkpoints/`` (the same names in both): the payloads read by
  ``torch.load`` equal, dicts with their keys in the same order, tensors bit for bit (dtype,
  shape and bytes), the same volatile values masked (the log it holds, its elapsed time,
  the wall-clock times in the seeds' state, and the state of Python's and numpy's global
  generators, which the run saves but does not seed);
- ``run.json``: equal but for its times, process id and paths;
- the console output (``--console``): line for line equal but for timings and paths.

Prints one line per difference (the first few of each file) and a verdict; exits 0 when the
runs match, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch

# Values that change from one run to the next of the same settings.
VOLATILE = {
    "started_at", "ended_at", "time", "updated_at", "stopped_at", "train_time_s", "eval_time_s", "epoch_time_s",
    "samples_per_s", "mean_epoch_time_s", "total_time_s", "elapsed_s", "host", "pid",
}
MASK = "<masked>"
# Generators a run saves but does not seed: their state comes from the OS at start-up.
UNSEEDED = {"python", "numpy"}
SHOWN = 5  # differences shown per file
_TIMING = re.compile(r"\d+(?:\.\d+)?s\b")


def _masked(value, folder: str):
    """``value`` with volatile entries masked and ``folder`` (the run's path) replaced."""
    if isinstance(value, dict):
        return {k: (MASK if k in VOLATILE else _masked(v, folder)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_masked(v, folder) for v in value)
    if isinstance(value, str):
        return value.replace(folder, "<RUN>")
    return value


def compare_log(a: Path, b: Path) -> list[str]:
    lines_a = a.read_text(encoding="utf-8").splitlines()
    lines_b = b.read_text(encoding="utf-8").splitlines()
    found = []
    if len(lines_a) != len(lines_b):
        found.append(f"{a.name}: {len(lines_a)} lines vs {len(lines_b)}")
    for i, (la, lb) in enumerate(zip(lines_a, lines_b), 1):
        ma = json.dumps(_masked(json.loads(la), str(a.parent)))
        mb = json.dumps(_masked(json.loads(lb), str(b.parent)))
        if ma != mb:
            found.append(f"{a.name} line {i}: {_first_difference(ma, mb)}")
    return found


def _first_difference(a: str, b: str) -> str:
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"...{a[max(0, at - 60):at + 60]!r} vs ...{b[max(0, at - 60):at + 60]!r}"


def _equal(a, b, where: str, folder_a: str, folder_b: str, found: list[str]) -> None:
    """Appends to ``found`` where the payloads ``a`` and ``b`` differ."""
    if len(found) > 50:
        return
    if type(a) is not type(b):
        found.append(f"{where}: {type(a).__name__} vs {type(b).__name__}")
    elif isinstance(a, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            found.append(f"{where}: tensor {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}")
        elif not torch.equal(_bytes(a), _bytes(b)):
            found.append(f"{where}: tensor values differ")
    elif isinstance(a, dict) and a.get("__class__") == "datetime" and b.get("__class__") == "datetime":
        return  # a wall-clock time in the seed's state (checkpoint.encode's tag)
    elif isinstance(a, dict):
        if list(a) != list(b):
            found.append(f"{where}: keys {list(a)} vs {list(b)}")
            return
        for key in a:
            if key in VOLATILE or (where.endswith(".rng") and key in UNSEEDED):
                continue
            _equal(a[key], b[key], f"{where}.{key}", folder_a, folder_b, found)
    elif isinstance(a, (list, tuple)):
        if len(a) != len(b):
            found.append(f"{where}: length {len(a)} vs {len(b)}")
            return
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{where}[{i}]", folder_a, folder_b, found)
    elif isinstance(a, float):
        if not (a == b or (math.isnan(a) and math.isnan(b))):
            found.append(f"{where}: {a!r} vs {b!r}")
    elif isinstance(a, str):
        if a.replace(folder_a, "<RUN>") != b.replace(folder_b, "<RUN>"):
            found.append(f"{where}: {a!r} vs {b!r}")
    elif a != b:
        found.append(f"{where}: {a!r} vs {b!r}")


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.bool and flat.numel() else flat


def compare_checkpoints(a: Path, b: Path) -> list[str]:
    names_a = sorted(p.name for p in (a / "checkpoints").glob("*.pt"))
    names_b = sorted(p.name for p in (b / "checkpoints").glob("*.pt"))
    if names_a != names_b:
        return [f"checkpoints: {names_a} vs {names_b}"]
    found = []
    for name in names_a:
        pa = torch.load(a / "checkpoints" / name, weights_only=True)
        pb = torch.load(b / "checkpoints" / name, weights_only=True)
        _equal(pa, pb, name, str(a), str(b), found)
    return found


def compare_status(a: Path, b: Path) -> list[str]:
    sa = json.loads((a / "run.json").read_text(encoding="utf-8"))
    sb = json.loads((b / "run.json").read_text(encoding="utf-8"))
    ma, mb = json.dumps(_masked(sa, str(a))), json.dumps(_masked(sb, str(b)))
    return [] if ma == mb else [f"run.json: {_first_difference(ma, mb)}"]


def _console(path: Path, folder: Path) -> list[str]:
    text = path.read_text(encoding="utf-8").replace(str(folder), "<RUN>")
    return [_TIMING.sub("<T>s", line) for line in text.splitlines()]


def compare_console(a: Path, b: Path, folder_a: Path, folder_b: Path) -> list[str]:
    la, lb = _console(a, folder_a), _console(b, folder_b)
    found = [] if len(la) == len(lb) else [f"console: {len(la)} lines vs {len(lb)}"]
    found += [f"console line {i}: {x!r} vs {y!r}" for i, (x, y) in enumerate(zip(la, lb), 1) if x != y]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--console", nargs=2, type=Path, metavar=("A.out", "B.out"),
                        help="the console output of each run")
    args = parser.parse_args(argv)
    a, b = args.run_a.resolve(), args.run_b.resolve()
    checks = {
        "metrics.jsonl": lambda: compare_log(a / "metrics.jsonl", b / "metrics.jsonl"),
        "checkpoints": lambda: compare_checkpoints(a, b),
        "run.json": lambda: compare_status(a, b),
    }
    if args.console:
        checks["console"] = lambda: compare_console(*args.console, a, b)
    same = True
    for name, check in checks.items():
        found = check()
        same &= not found
        print(f"{name}: {'same' if not found else f'{len(found)} difference(s)'}")
        for line in found[:SHOWN]:
            print(f"  {line}")
    print("the runs match" if same else "the runs differ")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
