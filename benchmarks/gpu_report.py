"""Times the benchmark cases, fast vs reference in one process, and writes a report part.

``python3 benchmarks/gpu_report.py [--device cuda|cpu] [--part goals|rest|all] [--quick | --once]
[--out DIR] [--report-name NAME] [--time-budget S] [--only TEXT] [--include-large]``

Imports every ``benchmarks/bench_*.py`` module's ``CASES`` (see ``benchmarks/common.py``),
measures the copy bandwidths of this machine (device-to-device, pinned host<->device), then
times each case's reference and fast callables (and its work floor, where it has one): CUDA
events after warm-up on ``cuda``, ``time.perf_counter`` on ``cpu``; the median of many repeats,
interleaved in two rounds, bounded in time per case. ``--once`` calls each side exactly once
(the CPU rehearsal of the GPU check). Writes the JSON after every case, so a crash or a timeout
keeps what was measured, and prints a short table last.

``--part goals`` takes the cases whose goal speaks of CUDA (``Case.gpu_goal``), ``--part rest``
the others: ``gpu_check.sh`` times the goals first and the rest with the time left.
A case that cannot run here is listed, never silently dropped: ``device only`` (a CUDA-only
case in a CPU run), ``left out (flag)`` (a ``Case.large`` case without ``--include-large``),
``not run (time)`` (the time budget was spent). Those do not fail the run; a module that fails
to import, a module without ``CASES`` and a case that raises do (exit status 1).

``benchmarks/gpu_finalize.py`` merges the parts and the other steps' results into
``gpu_report.json``.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (ROOT, HERE):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from common import goal_clauses  # noqa: E402
from report_format import (  # noqa: E402
    DEVICE_ONLY,
    ERROR,
    LEFT_OUT_FLAG,
    NOT_RUN_CONTEXT,
    NOT_RUN_TIME,
    OK,
    PENDING,
    QUIET_STATUSES,
    REPORT_NAME,
    RUNNING,
    SCHEMA,
    format_table,
    now_utc,
    suggested_name,
    write_json,
)

# Time spent timing one case (both sides together), repeats per side, and the same in --quick.
CASE_BUDGET_S = 3.0
QUICK_CASE_BUDGET_S = 0.3
MAX_REPEATS = 500
QUICK_MAX_REPEATS = 20
MIN_REPEATS = 3
PARTS = ("all", "goals", "rest")


# ----------------------------------------------------------------------------- small helpers

def error_text(exc: BaseException, limit: int = 12) -> str:
    """The exception and the innermost frames of its traceback, short enough for a report."""
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    text = "".join(lines).strip().splitlines()
    return "\n".join(text[-limit:])


def _run_quiet(cmd: list[str], timeout: float = 10.0) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def default_out_dir() -> str:
    return os.environ.get("OUT") or os.path.join(HERE, "results")


# ----------------------------------------------------------------------------- cases

def load_cases(bench_dir: str = HERE) -> tuple[list, list[dict]]:
    """Every ``CASES`` entry of ``bench_dir/bench_*.py``, and one problem per module that failed.

    A module that raises on import, or that has no ``CASES`` list, is recorded and skipped.
    """
    if bench_dir not in sys.path:  # the modules import their siblings (common, bench_validation...)
        sys.path.insert(0, bench_dir)
    cases, problems = [], []
    for path in sorted(glob.glob(os.path.join(bench_dir, "bench_*.py"))):
        module_name = os.path.splitext(os.path.basename(path))[0]
        try:
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        except BaseException as exc:  # noqa: BLE001  (a module may even call sys.exit)
            sys.modules.pop(module_name, None)
            problems.append({"module": module_name, "error": error_text(exc)})
            continue
        module_cases = getattr(module, "CASES", None)
        if not isinstance(module_cases, (list, tuple)):
            problems.append({"module": module_name, "error": "no CASES list"})
            continue
        cases.extend(module_cases)
    return cases, problems


def _is_host_transfer(case) -> bool:
    text = f"{case.family} {case.name}".lower()
    return "snapshot" in text or "rollback" in text or "restore" in text


def _host_link(case) -> str:
    """Which pinned host link bounds a snapshot-like case: restores go host-to-device."""
    text = case.name.lower()
    return "h2d" if ("restore" in text or "rollback" in text) else "d2h"


# ----------------------------------------------------------------------------- timing

class Timer:
    """Times ``fn(state)`` calls on one device; CUDA events on cuda, perf_counter on cpu."""

    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.cuda = device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def once(self, fn, state) -> float:
        """Wall seconds of one call, completion included (used for warm-up and estimates)."""
        self.sync()
        start = time.perf_counter()
        fn(state)
        self.sync()
        return time.perf_counter() - start

    def repeat(self, fn, state, repeats: int) -> tuple[list[float], float]:
        """Per-call milliseconds (device timeline on cuda) and the wall ms per call of the batch."""
        self.sync()
        wall_start = time.perf_counter()
        if self.cuda:
            event = self.torch.cuda.Event
            starts = [event(enable_timing=True) for _ in range(repeats)]
            ends = [event(enable_timing=True) for _ in range(repeats)]
            for start, end in zip(starts, ends):
                start.record()
                fn(state)
                end.record()
            self.torch.cuda.synchronize()
            times = [start.elapsed_time(end) for start, end in zip(starts, ends)]
        else:
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn(state)
                times.append((time.perf_counter() - start) * 1e3)
        wall_ms = (time.perf_counter() - wall_start) * 1e3 / repeats
        return times, wall_ms

    def peak_reset(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def peak_mib(self) -> float | None:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated() / 2**20
        return None


def _repeats(timer: Timer, sides: dict, state, budget_s: float, max_repeats: int) -> dict:
    """Calls per side that fit the case's budget, from one or two warm-up calls."""
    estimates = {}
    per_side_s = budget_s / 2
    for side, fn in sides.items():
        first = timer.once(fn, state)  # the first call pays allocation, lazy init, autotuning
        # A slow case is estimated from its first call: a second warm-up would cost seconds.
        estimates[side] = max(first if first > per_side_s / 3 else timer.once(fn, state), 1e-7)
    repeats = {}
    for side, estimate in estimates.items():
        fit = int(per_side_s / estimate)
        repeats[side] = max(1 if estimate * MIN_REPEATS > per_side_s else MIN_REPEATS, min(max_repeats, fit))
    return repeats


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))
    return ordered[index]


def time_case(case, device: str, budget_s: float, max_repeats: int, once: bool = False) -> dict:
    """Set the case up, warm each side, then time them interleaved in two rounds. ``once``:
    one timed call per side, nothing else (a rehearsal of the path, not a measurement)."""
    timer = Timer(device)
    setup_start = time.perf_counter()
    state = case.setup(device)
    timer.sync()
    result = {"setup_s": round(time.perf_counter() - setup_start, 3)}
    sides = {"reference": case.reference, "fast": case.fast}
    if getattr(case, "floor", None) is not None:
        sides["floor"] = case.floor  # the work no implementation can skip, timed alike
    rounds, repeats = (1, {side: 1 for side in sides}) if once else (2, _repeats(timer, sides, state, budget_s, max_repeats))
    times = {side: [] for side in sides}
    walls = {side: [] for side in sides}
    peaks = {side: None for side in sides}
    for _ in range(rounds):  # interleaved rounds: drift (clocks, heat) hits both sides alike
        for side, fn in sides.items():
            n = max(1, (repeats[side] + rounds - 1) // rounds)
            timer.peak_reset()
            side_times, wall_ms = timer.repeat(fn, state, n)
            times[side].extend(side_times)
            walls[side].append(wall_ms)
            peak = timer.peak_mib()
            if peak is not None:
                peaks[side] = max(peaks[side] or 0.0, peak)
    for side in sides:
        values = times[side]
        result[side] = {
            "median_ms": statistics.median(values),
            "p10_ms": _percentile(values, 0.1),
            "p90_ms": _percentile(values, 0.9),
            "repeats": len(values),
            "wall_ms_per_call": statistics.mean(walls[side]),
            "peak_alloc_mib": None if peaks[side] is None else round(peaks[side], 1),
        }
    result["bytes_moved"] = None
    if case.bytes_moved is not None:
        try:
            result["bytes_moved"] = int(case.bytes_moved(state))
        except Exception as exc:  # noqa: BLE001  (the timings stand without it)
            result["bytes_moved_error"] = error_text(exc, 4)
    del state
    return result


def case_row(case, timing: dict, floors: dict) -> dict:
    """The report's line for one timed case: times, ratio, bandwidth against the floors."""
    ref_ms = timing["reference"]["median_ms"]
    fast_ms = timing["fast"]["median_ms"]
    row = {
        "reference_ms": round(ref_ms, 6),
        "fast_ms": round(fast_ms, 6),
        "ratio": round(ref_ms / fast_ms, 4) if fast_ms > 0 else None,
        "timing": timing,
        "bytes_moved": timing.get("bytes_moved"),
        "gbps": None,
        "reference_gbps": None,
        "pct_copy": None,
        "host_link": None,
        "pct_host_link": None,
        "floor_ms": None,
        "pct_work_floor": None,
    }
    if "floor" in timing and fast_ms > 0:
        row["floor_ms"] = round(timing["floor"]["median_ms"], 6)
        row["pct_work_floor"] = round(100.0 * row["floor_ms"] / fast_ms, 2)
    moved = row["bytes_moved"]
    if moved and fast_ms > 0:
        row["gbps"] = round(moved / (fast_ms / 1e3) / 1e9, 3)
        row["reference_gbps"] = round(moved / (ref_ms / 1e3) / 1e9, 3) if ref_ms > 0 else None
        if floors.get("device_copy_gbps"):
            row["pct_copy"] = round(100.0 * row["gbps"] / floors["device_copy_gbps"], 2)
        if _is_host_transfer(case):
            link = _host_link(case)
            row["host_link"] = link
            floor = floors.get(f"{link}_pinned_gbps")
            if floor:
                row["pct_host_link"] = round(100.0 * row["gbps"] / floor, 2)
    return row


# ----------------------------------------------------------------------------- goals

_GOAL_RATIO = re.compile(r">=\s*([0-9.]+)\s*x")
_GOAL_PCT = re.compile(r">=\s*([0-9.]+)\s*%")


def evaluate_goal(goal: str, row: dict, device: str | None = None) -> dict:
    """Judge a goal written like ``">= 3x"``, ``">= 80% of copy"``, ``">= 80% of floor"`` (the
    case's work floor), ``"never slower; >= 1.3x"``.

    Each clause that applies on ``device`` (:func:`common.goal_clauses`) is met, not met, or not
    judged (a clause this parser does not understand, or a number the run did not produce).
    The goal is met only when every such clause is judged and met.
    """
    clauses = []
    for text in goal_clauses(goal, device):
        lowered = text.lower()
        value, need, what = None, None, None
        ratio, pct = _GOAL_RATIO.search(lowered), _GOAL_PCT.search(lowered)
        if "never slower" in lowered:
            value, need, what = row.get("ratio"), 1.0, "ratio"
        elif ratio:
            value, need, what = row.get("ratio"), float(ratio.group(1)), "ratio"
        elif pct:
            need = float(pct.group(1))
            if "floor" in lowered:  # the case's own work floor, timed alike
                value, what = row.get("pct_work_floor"), "pct_work_floor"
            elif any(word in lowered for word in ("pinned", "host", "d2h", "h2d", "pcie")):
                value, what = row.get("pct_host_link"), "pct_host_link"
            else:
                value, what = row.get("pct_copy"), "pct_copy"
        met = None if value is None or need is None else bool(value >= need)
        clauses.append({"clause": text, "measure": what, "value": value, "need": need, "met": met})
    verdicts = [c["met"] for c in clauses]
    met = None if (not verdicts or any(v is None for v in verdicts)) else all(verdicts)
    return {"met": met, "clauses": clauses}


# ----------------------------------------------------------------------------- floors

def measure_floors(device: str, quick: bool) -> dict:
    """Copy bandwidths of this machine, measured now: the yardsticks for every case."""
    import torch

    timer = Timer(device)
    floors = {}
    if device.startswith("cuda"):
        nbytes = (64 if quick else 1024) * 2**20
        src = torch.randn(nbytes // 4, device=device)
        dst = torch.empty_like(src)
        copy_ms = _median_ms(timer, lambda _: dst.copy_(src), 5 if quick else 20)
        floors["device_copy_bytes"] = 2 * nbytes
        floors["device_copy_gbps"] = round(2 * nbytes / (copy_ms / 1e3) / 1e9, 2)
        del dst
        host_bytes = (32 if quick else 256) * 2**20
        dev = src[: host_bytes // 4]
        pinned = torch.empty(dev.shape, dtype=dev.dtype, pin_memory=True)
        d2h_ms = _median_ms(timer, lambda _: pinned.copy_(dev, non_blocking=True), 3 if quick else 10)
        h2d_ms = _median_ms(timer, lambda _: dev.copy_(pinned, non_blocking=True), 3 if quick else 10)
        pageable_ms = _median_ms(timer, lambda _: dev.cpu(), 3)  # what a per-tensor .cpu() gets
        floors["host_copy_bytes"] = host_bytes
        floors["d2h_pinned_gbps"] = round(host_bytes / (d2h_ms / 1e3) / 1e9, 2)
        floors["h2d_pinned_gbps"] = round(host_bytes / (h2d_ms / 1e3) / 1e9, 2)
        floors["d2h_pageable_gbps"] = round(host_bytes / (pageable_ms / 1e3) / 1e9, 2)
        del src, dev, pinned
        torch.cuda.empty_cache()
    else:
        nbytes = (16 if quick else 256) * 2**20
        src = torch.randn(nbytes // 4)
        dst = torch.empty_like(src)
        copy_ms = _median_ms(timer, lambda _: dst.copy_(src), 5 if quick else 10)
        floors["device_copy_bytes"] = 2 * nbytes
        floors["device_copy_gbps"] = round(2 * nbytes / (copy_ms / 1e3) / 1e9, 2)
    floors["counting"] = "copy: bytes read + bytes written; host links: bytes transferred"
    return floors


def _median_ms(timer: Timer, fn, repeats: int) -> float:
    timer.once(fn, None)
    times, _ = timer.repeat(fn, None, repeats)
    return statistics.median(times)


# ----------------------------------------------------------------------------- environment

def environment(device: str) -> dict:
    import torch

    env = {
        "created_utc": now_utc(),
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.machine(),
        "git_commit": _run_quiet(["git", "rev-parse", "HEAD"]),
        "card": None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        env["card"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None,
            "driver": _run_quiet(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        }
    elif device == "cpu":
        env["card"] = {"name": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"}
    try:
        import esper_fast

        env["esper_fast"] = {
            "version": esper_fast.__version__,
            "extension": os.path.relpath(esper_fast.extension_path(), ROOT),
            "kernels": esper_fast.kernels_available(),
        }
    except Exception as exc:  # noqa: BLE001  (the report must say why, not crash)
        env["esper_fast"] = {"error": error_text(exc, 4)}
    return env


# ----------------------------------------------------------------------------- the benchmark run

def select_cases(cases: list, part: str, only: str | None = None) -> list:
    """The cases of one part of the check, in their modules' order."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    chosen = [c for c in cases if part == "all" or (getattr(c, "gpu_goal", False) == (part == "goals"))]
    return [c for c in chosen if not only or only in getattr(c, "name", "")]


def _skip_reason(case, device: str, include_large: bool) -> str | None:
    """Why a case is listed without being timed, or None when it runs."""
    if device.split(":")[0] not in tuple(getattr(case, "devices", ("cpu", "cuda"))):
        return DEVICE_ONLY
    if getattr(case, "large", False) and not include_large:
        return LEFT_OUT_FLAG
    return None


def run_benchmarks(
    cases: list,
    problems: list[dict],
    device: str,
    quick: bool,
    out_path: str,
    time_budget_s: float | None = None,
    case_budget_s: float | None = None,
    *,
    once: bool = False,
    include_large: bool = False,
    part: str = "all",
) -> dict:
    import torch

    started = time.perf_counter()
    report = environment(device)
    report["schema"] = SCHEMA
    report["part"] = part
    report["timing"] = {
        "clock": "cuda events" if device.startswith("cuda") else "time.perf_counter",
        "statistic": "one call per side" if once else
        "median of the repeats of two interleaved rounds per side, after one or two warm-up calls",
        "case_budget_s": case_budget_s or (QUICK_CASE_BUDGET_S if quick else CASE_BUDGET_S),
        "time_budget_s": time_budget_s,
        "quick": quick,
        "once": once,
    }
    report["import_problems"] = problems
    report["cases"] = []
    report["floors"] = {}
    report["suggested_name"] = suggested_name(report)
    report["bench_state"] = "measuring floors"
    write_json(out_path, report)

    if device.startswith("cuda") and not torch.cuda.is_available():
        report["bench_state"] = "error: CUDA is not available"
        write_json(out_path, report)
        return report
    try:
        report["floors"] = measure_floors(device, quick or once)
    except Exception as exc:  # noqa: BLE001
        report["floors"] = {"error": error_text(exc)}

    budget = case_budget_s or (QUICK_CASE_BUDGET_S if quick else CASE_BUDGET_S)
    max_repeats = QUICK_MAX_REPEATS if quick else MAX_REPEATS
    rows = [{
        "family": getattr(case, "family", "?"),
        "name": getattr(case, "name", repr(case)),
        "params": dict(getattr(case, "params", {}) or {}),
        "goal": getattr(case, "goal", "") or "",
        "gpu_goal": bool(getattr(case, "gpu_goal", False)),
        "status": _skip_reason(case, device, include_large) or PENDING,
    } for case in cases]
    report["cases"] = rows
    runnable = sum(1 for row in rows if row["status"] == PENDING)
    lost_context = None
    for case, row in zip(cases, rows):
        if row["status"] != PENDING:
            continue
        runnable -= 1
        row["status"] = RUNNING
        report["bench_state"] = f"running {row['name']}"
        write_json(out_path, report)
        left = None if time_budget_s is None else time_budget_s - (time.perf_counter() - started)
        if lost_context:
            row.update(status=NOT_RUN_CONTEXT, error=f"the CUDA context was lost in '{lost_context}'")
            continue
        if left is not None and left < 1.0:
            row.update(status=NOT_RUN_TIME, error="the benchmark time budget was spent")
            continue
        this_budget = budget if left is None else min(budget, max(0.2, (left - 2.0) / (runnable + 1)))
        try:
            timing = time_case(case, device, this_budget, max_repeats, once=once)
            row.update(case_row(case, timing, report["floors"]))
            row["goal_verdict"] = evaluate_goal(row["goal"], row, device)
            row["status"] = OK
        except Exception as exc:  # noqa: BLE001  (one broken case must not hide the others)
            row.update(status=ERROR, error=error_text(exc))
            if device.startswith("cuda") and not _cuda_alive():
                lost_context = row["name"]
        finally:
            if device.startswith("cuda"):
                try:
                    torch.cuda.empty_cache()
                except Exception:  # noqa: BLE001
                    pass
    report["bench_state"] = "done"
    report["bench_seconds"] = round(time.perf_counter() - started, 1)
    write_json(out_path, report)
    return report


def case_rows(cases: list) -> str:
    """RESULTS.md's table rows (the columns of ``gpu_finalize.py --markdown``) for cases that no
    GPU report has timed yet: name, sizes and goal, no number."""
    lines = []
    for case in cases:
        params = ", ".join(f"{k}={v}" for k, v in (case.params or {}).items()) or "-"
        status = "not run" + (" (large)" if case.large else "")
        lines.append(f"| {case.family} | {case.name} | {params} | {status} | | | | | {case.goal or '-'} | not judged | | |")
    return "\n".join(lines)


def failed(report: dict) -> bool:
    """A run fails on a module that did not load, a case that raised, or a run that did not end."""
    return bool(report.get("bench_state") != "done" or report.get("import_problems")
                or any(c.get("status") not in (OK, *QUIET_STATUSES) for c in report.get("cases", [])))


def _cuda_alive() -> bool:
    import torch

    try:
        torch.cuda.synchronize()
        torch.ones(1, device="cuda").add_(1).sum().item()
        return True
    except Exception:  # noqa: BLE001  (a sticky error: every later CUDA call fails)
        return False


# ----------------------------------------------------------------------------- entry point

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (CUDA events) or cpu (perf_counter)")
    parser.add_argument("--part", default="all", choices=PARTS,
                        help="goals: the cases with a CUDA goal; rest: the others (default all)")
    timing = parser.add_mutually_exclusive_group()
    timing.add_argument("--quick", action="store_true", help="short budgets per case")
    timing.add_argument("--once", action="store_true", help="one call per side: a rehearsal of the path")
    parser.add_argument("--out", default=None, help="folder for the report (default: $OUT or benchmarks/results)")
    parser.add_argument("--report-name", default=REPORT_NAME, help=f"file name of the report (default {REPORT_NAME})")
    parser.add_argument("--bench-dir", default=HERE, help="folder holding the bench_*.py modules")
    parser.add_argument("--only", default=None, help="time only cases whose name contains this text")
    parser.add_argument("--include-large", action="store_true", help="also time the cases marked large (many GB)")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds for all cases together")
    parser.add_argument("--case-budget", type=float, default=None, help="seconds of timing per case")
    parser.add_argument("--list", action="store_true",
                        help="print every case as a row of RESULTS.md's table (nothing measured), then exit")
    args = parser.parse_args(argv)
    out_path = os.path.join(args.out or default_out_dir(), args.report_name)

    cases, problems = load_cases(args.bench_dir)
    if args.list:
        print(case_rows(cases))
        return 1 if problems else 0
    cases = select_cases(cases, args.part, args.only)
    report = run_benchmarks(cases, problems, args.device, args.quick, out_path, args.time_budget, args.case_budget,
                            once=args.once, include_large=args.include_large, part=args.part)
    print(format_table(report), flush=True)
    print(f"report: {out_path}", flush=True)
    return 1 if failed(report) else 0


if __name__ == "__main__":
    sys.exit(main())
