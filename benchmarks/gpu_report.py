"""Times every benchmark case fast vs reference in one process and writes ``gpu_report.json``.

Two modes:

``python3 benchmarks/gpu_report.py [--device cuda|cpu] [--quick] [--out DIR] [--time-budget S]``
    Imports every ``benchmarks/bench_*.py`` module's ``CASES`` (see ``benchmarks/common.py``),
    measures the copy bandwidths of this machine (device-to-device, pinned host<->device),
    then times each case's reference and fast callables on the device: CUDA events after
    warm-up on ``cuda``, ``time.perf_counter`` on ``cpu``; the median of many repeats,
    interleaved in two rounds, bounded in time per case. Writes the JSON after every case,
    so a crash or a timeout keeps what was measured, and prints a short table last.
    A module that fails to import, a module without ``CASES`` and a case that raises are
    recorded in the report; they never stop the run.

``python3 benchmarks/gpu_report.py --finalize --out DIR [--steps F] [--junit F] ...``
    Used by ``benchmarks/gpu_check.sh`` after its steps: merges the build log (ptxas
    registers and spills), the test results (junit xml), the memcheck, racecheck and synccheck
    logs and each step's status into the report, prints the table and exits 0 only if every step passed.

The report goes to ``$OUT`` when set, else ``benchmarks/results/``. Performance goals are
reported (met / not met / not judged) but do not decide the exit status: the check passes
when everything builds, runs and is correct.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ElementTree

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCHEMA = "esper_fast.gpu_report/1"
REPORT_NAME = "gpu_report.json"

# Time spent timing one case (both sides together), repeats per side, and the same in --quick.
CASE_BUDGET_S = 3.0
QUICK_CASE_BUDGET_S = 0.3
MAX_REPEATS = 500
QUICK_MAX_REPEATS = 20
MIN_REPEATS = 3


# ----------------------------------------------------------------------------- small helpers

def _now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def _error_text(exc: BaseException, limit: int = 12) -> str:
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


def write_json(path: str, data: dict) -> None:
    """Write atomically: a reader (or a killed run) never sees half a report."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)


def default_out_dir() -> str:
    return os.environ.get("OUT") or os.path.join(HERE, "results")


# ----------------------------------------------------------------------------- cases

def load_cases(bench_dir: str = HERE) -> tuple[list, list[dict]]:
    """Every ``CASES`` entry of ``bench_dir/bench_*.py``, and one problem per module that failed.

    A module that raises on import, or that has no ``CASES`` list, is recorded and skipped.
    """
    for path in (ROOT, HERE, bench_dir):
        if path not in sys.path:
            sys.path.insert(0, path)
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
            problems.append({"module": module_name, "error": _error_text(exc)})
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


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))
    return ordered[index]


def time_case(case, device: str, budget_s: float, max_repeats: int) -> dict:
    """Set the case up, warm both sides, then time them interleaved in two rounds."""
    timer = Timer(device)
    setup_start = time.perf_counter()
    state = case.setup(device)
    timer.sync()
    result = {"setup_s": round(time.perf_counter() - setup_start, 3)}
    sides = {"reference": case.reference, "fast": case.fast}
    if getattr(case, "floor", None) is not None:
        sides["floor"] = case.floor  # the work no implementation can skip, timed alike
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
    times = {side: [] for side in sides}
    walls = {side: [] for side in sides}
    peaks = {side: None for side in sides}
    for _ in range(2):  # interleaved rounds: drift (clocks, heat) hits both sides alike
        for side, fn in sides.items():
            n = max(1, (repeats[side] + 1) // 2)
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
            result["bytes_moved_error"] = _error_text(exc, 4)
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
    """Judge a goal written like ``">= 3x"``, ``">= 80% of copy"``, ``"never slower; >= 1.3x"``.

    Each clause (split on ``;``, ``,`` and `` and ``) is met, not met, or not judged (a clause
    this parser does not understand, or a number the run did not produce). A clause naming
    the other device ("CPU >= 2x" in a CUDA run) is left out. The goal is met only when every
    remaining clause is judged and met.
    """
    if not goal or not goal.strip():
        return {"met": None, "clauses": []}
    clauses = []
    for text in re.split(r";|,|\band\b", goal.replace("\u2265", ">=")):
        text = text.strip()
        if not text:
            continue
        lowered = text.lower()
        other = ("cpu",) if device and device.startswith("cuda") else ("cuda", "gpu") if device == "cpu" else ()
        if any(re.search(rf"\b{word}\b", lowered) for word in other):
            continue
        value, need, what = None, None, None
        ratio, pct = _GOAL_RATIO.search(lowered), _GOAL_PCT.search(lowered)
        if "never slower" in lowered:
            value, need, what = row.get("ratio"), 1.0, "ratio"
        elif ratio:
            value, need, what = row.get("ratio"), float(ratio.group(1)), "ratio"
        elif pct:
            need = float(pct.group(1))
            if any(word in lowered for word in ("pinned", "host", "d2h", "h2d", "pcie")):
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
        "created_utc": _now_utc(),
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
        env["esper_fast"] = {"error": _error_text(exc, 4)}
    return env


def suggested_name(report: dict) -> str:
    """``<date>_<card>.json``: the name under benchmarks/results/ when the report is committed."""
    card = (report.get("card") or {}).get("name") or report.get("device", "unknown")
    date = (report.get("created_utc") or _now_utc())[:10]
    return f"{date}_{re.sub(r'[^A-Za-z0-9.]+', '-', card).strip('-')}.json"


# ----------------------------------------------------------------------------- the benchmark run

def run_benchmarks(
    cases: list,
    problems: list[dict],
    device: str,
    quick: bool,
    out_path: str,
    time_budget_s: float | None = None,
    case_budget_s: float | None = None,
) -> dict:
    import torch

    started = time.perf_counter()
    report = environment(device)
    report["schema"] = SCHEMA
    report["timing"] = {
        "clock": "cuda events" if device.startswith("cuda") else "time.perf_counter",
        "statistic": "median of the repeats of two interleaved rounds per side, after two warm-up calls",
        "case_budget_s": case_budget_s or (QUICK_CASE_BUDGET_S if quick else CASE_BUDGET_S),
        "time_budget_s": time_budget_s,
        "quick": quick,
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
        report["floors"] = measure_floors(device, quick)
    except Exception as exc:  # noqa: BLE001
        report["floors"] = {"error": _error_text(exc)}

    selected = [c for c in cases if device.split(":")[0] in tuple(getattr(c, "devices", ("cpu", "cuda")))]
    budget = case_budget_s or (QUICK_CASE_BUDGET_S if quick else CASE_BUDGET_S)
    max_repeats = QUICK_MAX_REPEATS if quick else MAX_REPEATS
    lost_context = None
    for index, case in enumerate(selected):
        row = {
            "family": getattr(case, "family", "?"),
            "name": getattr(case, "name", repr(case)),
            "params": dict(getattr(case, "params", {}) or {}),
            "goal": getattr(case, "goal", "") or "",
            "status": "running",
        }
        report["cases"].append(row)
        report["bench_state"] = f"running {row['name']}"
        write_json(out_path, report)
        left = None if time_budget_s is None else time_budget_s - (time.perf_counter() - started)
        if lost_context:
            row.update(status="not run", error=f"the CUDA context was lost in '{lost_context}'")
            continue
        if left is not None and left < 1.0:
            row.update(status="not run", error="the benchmark time budget was spent")
            continue
        this_budget = budget if left is None else min(budget, max(0.2, (left - 2.0) / (len(selected) - index)))
        try:
            timing = time_case(case, device, this_budget, max_repeats)
            row.update(case_row(case, timing, report["floors"]))
            row["goal_verdict"] = evaluate_goal(row["goal"], row, device)
            row["status"] = "ok"
        except Exception as exc:  # noqa: BLE001  (one broken case must not hide the others)
            row.update(status="error", error=_error_text(exc))
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


def _cuda_alive() -> bool:
    import torch

    try:
        torch.cuda.synchronize()
        torch.ones(1, device="cuda").add_(1).sum().item()
        return True
    except Exception:  # noqa: BLE001  (a sticky error: every later CUDA call fails)
        return False


# ----------------------------------------------------------------------------- step summaries

def read_steps(path: str | None) -> dict:
    """``name<TAB>status<TAB>rc<TAB>seconds<TAB>timeout_s<TAB>log`` lines written by gpu_check.sh."""
    steps = {}
    if not path or not os.path.exists(path):
        return steps
    with open(path) as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 4:
                continue
            name, status, rc, seconds = fields[:4]
            steps[name] = {
                "status": status,
                "rc": int(rc) if rc.lstrip("-").isdigit() else None,
                "seconds": float(seconds) if seconds.replace(".", "", 1).isdigit() else None,
                "timeout_s": float(fields[4]) if len(fields) > 4 and fields[4].isdigit() else None,
                "log": fields[5] if len(fields) > 5 else None,
            }
    return steps


_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def summarize_build(log_path: str | None) -> dict:
    """nvcc version, warning count and, per kernel, ptxas registers / stack / spills."""
    summary = {"nvcc": None, "warnings": 0, "kernels": []}
    if not log_path or not os.path.exists(log_path):
        return summary
    with open(log_path, errors="replace") as f:
        text = f.read()
    version = re.search(r"Cuda compilation tools, release ([^\n]+)", text)
    summary["nvcc"] = version.group(1).strip() if version else None
    summary["warnings"] = sum(1 for line in text.splitlines() if re.search(r"\bwarning\b", line, re.I))
    kernel = None
    for line in text.splitlines():
        entry = _PTXAS_ENTRY.search(line)
        if entry:
            kernel = {"kernel": entry.group(1), "arch": entry.group(2), "registers": None,
                      "stack_bytes": None, "spill_stores": None, "spill_loads": None, "smem_bytes": None}
            summary["kernels"].append(kernel)
            continue
        if kernel is None:
            continue
        frame = _PTXAS_FRAME.search(line)
        if frame:
            kernel["stack_bytes"], kernel["spill_stores"], kernel["spill_loads"] = map(int, frame.groups())
        used = _PTXAS_USED.search(line)
        if used:
            kernel["registers"] = int(used.group(1))
            kernel["smem_bytes"] = int(used.group(2)) if used.group(2) else 0
    _demangle(summary["kernels"])
    summary["spilling_kernels"] = sum(1 for k in summary["kernels"] if (k["spill_stores"] or 0) > 0)
    return summary


def _demangle(kernels: list[dict]) -> None:
    names = [k["kernel"] for k in kernels]
    if not names:
        return
    try:
        done = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, timeout=10)
        readable = done.stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return
    if len(readable) == len(names):
        for kernel, name in zip(kernels, readable):
            kernel["demangled"] = name


def summarize_tests(junit_path: str | None, log_path: str | None = None) -> dict:
    """Counts and failing test names from pytest's junit xml; the log's last line otherwise."""
    summary = {"source": None, "total": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    if junit_path and os.path.exists(junit_path):
        try:
            root = ElementTree.parse(junit_path).getroot()
            for case in root.iter("testcase"):
                summary["total"] += 1
                outcome = "passed"
                for child in case:
                    if child.tag in ("failure", "error", "skipped"):
                        outcome = child.tag
                        message = (child.get("message") or child.text or "").strip().splitlines()
                        break
                if outcome == "passed":
                    summary["passed"] += 1
                elif outcome == "skipped":
                    summary["skipped"] += 1
                else:
                    summary["failed" if outcome == "failure" else "errors"] += 1
                    name = f"{case.get('classname', '')}::{case.get('name', '')}"
                    summary["failures"].append({"test": name, "kind": outcome,
                                                "message": (message[0] if message else "")[:300]})
            summary["source"] = "junit"
            return summary
        except ElementTree.ParseError:
            pass
    if log_path and os.path.exists(log_path):
        with open(log_path, errors="replace") as f:
            lines = f.read().splitlines()
        for line in reversed(lines):
            if re.search(r"\b(passed|failed|error|errors|skipped|deselected|no tests ran)\b", line) and " in " in line:
                for count, word in re.findall(r"(\d+) (passed|failed|errors?|skipped)", line):
                    key = {"error": "errors"}.get(word, word)
                    summary[key] = int(count)
                summary["total"] = summary["passed"] + summary["failed"] + summary["errors"] + summary["skipped"]
                summary["source"] = "log"
                break
        summary["failures"] = [{"test": line.split(" ", 1)[1].split(" - ")[0], "kind": "failure", "message": ""}
                               for line in lines if line.startswith(("FAILED ", "ERROR "))][:50]
    return summary


_CHECK_LINE = re.compile(r"^memcheck_ops: check (\S+): (ok|FAILED)(.*)$")


def summarize_memcheck(log_path: str | None) -> dict:
    """compute-sanitizer's error count and memcheck_ops.py's per-check results (any tool's log:
    memcheck and synccheck end with an ERROR SUMMARY, racecheck with a RACECHECK SUMMARY)."""
    summary = {"sanitizer": False, "errors": None, "checks": {}, "failed_checks": []}
    if not log_path or not os.path.exists(log_path):
        return summary
    with open(log_path, errors="replace") as f:
        lines = f.read().splitlines()
    for line in lines:
        if "COMPUTE-SANITIZER" in line:
            summary["sanitizer"] = True
        errors = re.search(r"ERROR SUMMARY: (\d+) error", line) or re.search(
            r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) errors?", line)
        if errors:
            summary["errors"] = int(errors.group(1))
        check = _CHECK_LINE.match(line.strip())
        if check:
            name, outcome, detail = check.groups()
            summary["checks"][name] = outcome if outcome == "ok" else f"FAILED{detail}"[:300]
            if outcome != "ok":
                summary["failed_checks"].append(name)
    return summary


# ----------------------------------------------------------------------------- verdicts and table

def _step_ok(steps: dict, name: str) -> bool:
    return steps.get(name, {}).get("status") == "ok"


SANITIZER_STEPS = ("memcheck", "racecheck", "synccheck")


def finalize(out_dir: str, steps_path: str | None, build_log: str | None, junit: str | None,
             tests_log: str | None, memcheck_log: str | None, racecheck_log: str | None = None,
             synccheck_log: str | None = None) -> tuple[dict, bool]:
    """Merge the steps' outcomes into the report in ``out_dir`` (created if missing)."""
    path = os.path.join(out_dir, REPORT_NAME)
    report = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                report = json.load(f)
        except (OSError, ValueError) as exc:
            report = {"report_read_error": str(exc)}
    if "torch" not in report:
        try:
            report.update(environment("cuda"))
        except Exception as exc:  # noqa: BLE001
            report["environment_error"] = _error_text(exc, 4)
        report.setdefault("cases", [])
    report["schema"] = SCHEMA
    report.setdefault("suggested_name", suggested_name(report))
    for row in report.get("cases", []):
        if row.get("status") == "running":
            row.update(status="error", error="the benchmark process ended during this case (crash or timeout)")
    steps = read_steps(steps_path)
    report["steps"] = steps

    build = summarize_build(build_log)
    build["ok"] = _step_ok(steps, "build")
    tests = summarize_tests(junit, tests_log)
    tests["ok"] = (_step_ok(steps, "tests") and tests["passed"] > 0
                   and tests["failed"] == 0 and tests["errors"] == 0)
    sanitizers = {}
    for name, log in zip(SANITIZER_STEPS, (memcheck_log, racecheck_log, synccheck_log)):
        summary = summarize_memcheck(log)
        summary["ok"] = (_step_ok(steps, name) and summary["sanitizer"] and summary["errors"] == 0
                         and bool(summary["checks"]) and not summary["failed_checks"])
        sanitizers[name] = summary
    cases = report.get("cases", [])
    bench = {
        "cases": len(cases),
        "ok_cases": sum(1 for c in cases if c.get("status") == "ok"),
        "error_cases": [c.get("name") for c in cases if c.get("status") != "ok"],
        "import_problems": [p.get("module") for p in report.get("import_problems", [])],
        "state": report.get("bench_state"),
    }
    bench["ok"] = (_step_ok(steps, "bench") and bench["ok_cases"] > 0
                   and not bench["error_cases"] and not bench["import_problems"])
    # The distributed step's own numbers (bench_distributed.py --json), when it ran.
    distributed = {"ok": _step_ok(steps, "distributed"), "results": None}
    distributed_json = os.path.join(out_dir, "distributed.json")
    if os.path.exists(distributed_json):
        with open(distributed_json) as f:
            distributed["results"] = json.load(f)
    parts = [build, tests, bench, *sanitizers.values()]
    if "distributed" in steps:
        parts.append(distributed)
    report.update(build=build, tests=tests, bench=bench, distributed=distributed, **sanitizers)
    report["ok"] = all(part["ok"] for part in parts)
    write_json(path, report)
    return report, report["ok"]


def _fmt(value, spec: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def format_table(report: dict) -> str:
    card = (report.get("card") or {}).get("name") or report.get("device", "?")
    floors = report.get("floors") or {}
    lines = [
        f"esper_fast {report.get('device', '?')} report: {card}; torch {report.get('torch')} "
        f"(CUDA {report.get('cuda')}); {report.get('created_utc')}",
        "floors: copy {} GB/s (read+write){}".format(
            _fmt(floors.get("device_copy_gbps"), ".1f"),
            "; pinned D2H {} GB/s, H2D {} GB/s, pageable D2H {} GB/s".format(
                _fmt(floors.get("d2h_pinned_gbps"), ".1f"), _fmt(floors.get("h2d_pinned_gbps"), ".1f"),
                _fmt(floors.get("d2h_pageable_gbps"), ".1f")) if "d2h_pinned_gbps" in floors else ""),
    ]
    if "error" in floors:
        lines.append(f"floors: ERROR {floors['error'].splitlines()[-1]}")
    header = f"{'family':<11}{'case':<44}{'ref ms':>10}{'fast ms':>10}{'ratio':>8}{'GB/s':>9}{'%floor':>8}  {'goal':<20}met"
    lines += [header, "-" * len(header)]
    for row in report.get("cases", []):
        name = row.get("name", "?")
        name = name if len(name) <= 43 else name[:40] + "..."
        if row.get("status") != "ok":
            first = (row.get("error") or "").strip().splitlines()
            lines.append(f"{row.get('family', '?'):<11}{name:<44}{row.get('status', '?').upper()}: "
                         f"{(first[-1] if first else '')[:70]}")
            continue
        pct = row.get("pct_host_link") if row.get("host_link") else row.get("pct_copy")
        pct_text = f"{pct:.0f}%{'h' if row.get('host_link') else 'c'}" if pct is not None else "-"
        if pct is None and row.get("pct_work_floor") is not None:
            pct_text = f"{row['pct_work_floor']:.0f}%w"
        met = (row.get("goal_verdict") or {}).get("met")
        met_text = {True: "yes", False: "NO", None: "-"}[met]
        goal = row.get("goal") or "-"
        lines.append(f"{row.get('family', '?'):<11}{name:<44}{_fmt(row.get('reference_ms'), '10.3f'):>10}"
                     f"{_fmt(row.get('fast_ms'), '10.3f'):>10}{_fmt(row.get('ratio'), '7.2f') + 'x':>8}"
                     f"{_fmt(row.get('gbps'), '9.1f'):>9}{pct_text:>8}  {goal[:15]:<16}{met_text}")
    state = report.get("bench_state")
    if state and state != "done":
        lines.append(f"benchmarks: {state}")
    for problem in report.get("import_problems", []):
        last = (problem.get("error") or "").strip().splitlines()
        lines.append(f"IMPORT {problem.get('module')}: {(last[-1] if last else '')[:90]}")
    lines.append("%floor: c = of the device copy, h = of the pinned host link (snapshot cases), "
                 "w = the least work timed alike (validation cases)")
    if "steps" in report:
        lines.append(_steps_line(report))
        lines.append(f"RESULT: {'PASS' if report.get('ok') else 'FAIL'}")
    return "\n".join(lines)


def _steps_line(report: dict) -> str:
    steps = report.get("steps", {})

    def state(name: str, ok: bool | None) -> str:
        step = steps.get(name, {})
        word = "ok" if ok else (step.get("status") or "missing")
        if ok is False and word == "ok":
            word = "FAILED"
        seconds = step.get("seconds")
        return f"{name} {word}{f' ({seconds:.0f} s)' if seconds is not None else ''}"

    build, tests, bench = (report.get(k, {}) for k in ("build", "tests", "bench"))
    spills = build.get("spilling_kernels")
    parts = [
        state("build", build.get("ok")) + f", {len(build.get('kernels', []))} kernels"
        + (f", {spills} spilling" if spills else ""),
        state("tests", tests.get("ok")) + f": {tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, "
        f"{tests.get('errors', 0)} errors, {tests.get('skipped', 0)} skipped",
        *(state(name, tool.get("ok")) + f": {_fmt(tool.get('errors'), 'd', '?')} errors, "
          f"{len(tool.get('checks', {})) - len(tool.get('failed_checks', []))}/{len(tool.get('checks', {}))} checks"
          for name, tool in ((n, report.get(n, {})) for n in SANITIZER_STEPS)),
        state("bench", bench.get("ok")) + f": {bench.get('ok_cases', 0)}/{bench.get('cases', 0)} cases"
        + (f", {len(bench.get('import_problems', []))} modules not imported" if bench.get("import_problems") else ""),
    ]
    failing = [f["test"] for f in tests.get("failures", [])][:10]
    text = "steps: " + " | ".join(parts)
    if failing:
        text += "\nfailed tests: " + ", ".join(failing)
    return text


def markdown_rows(report: dict) -> str:
    """RESULTS.md's table rows for a committed report, so that no number is typed by hand."""
    card = (report.get("card") or {}).get("name") or report.get("device", "?")
    source = report.get("suggested_name", "?")
    lines = []
    for row in report.get("cases", []):
        params = ", ".join(f"{k}={v}" for k, v in (row.get("params") or {}).items()) or "-"
        if row.get("status") != "ok":
            lines.append(f"| {row.get('family')} | {row.get('name')} | {params} | {row.get('status')} "
                         f"| | | | | {row.get('goal') or '-'} | not judged | {card} | {source} |")
            continue
        if row.get("host_link") and row.get("pct_host_link") is not None:
            floor = f"{row['pct_host_link']:.0f}% of pinned {row['host_link'].upper()}"
        elif row.get("pct_copy") is not None:
            floor = f"{row['pct_copy']:.0f}% of copy"
        else:
            floor = "-"
        met = {True: "met", False: "not met", None: "not judged"}[(row.get("goal_verdict") or {}).get("met")]
        lines.append(f"| {row.get('family')} | {row.get('name')} | {params} | {_fmt(row.get('reference_ms'), '.4f')} "
                     f"| {_fmt(row.get('fast_ms'), '.4f')} | {_fmt(row.get('ratio'), '.2f')}x "
                     f"| {_fmt(row.get('gbps'), '.1f')} | {floor} | {row.get('goal') or '-'} | {met} | {card} | {source} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- entry point

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (CUDA events) or cpu (perf_counter dry run)")
    parser.add_argument("--quick", action="store_true", help="short budgets: a dry run of the report path")
    parser.add_argument("--out", default=None, help="folder for gpu_report.json (default: $OUT or benchmarks/results)")
    parser.add_argument("--bench-dir", default=HERE, help="folder holding the bench_*.py modules")
    parser.add_argument("--only", default=None, help="time only cases whose name contains this text")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds for all cases together")
    parser.add_argument("--case-budget", type=float, default=None, help="seconds of timing per case")
    parser.add_argument("--finalize", action="store_true", help="merge gpu_check.sh's step results")
    parser.add_argument("--markdown", metavar="REPORT", default=None,
                        help="print RESULTS.md table rows for a report file, then exit")
    parser.add_argument("--steps", default=None)
    parser.add_argument("--build-log", default=None)
    parser.add_argument("--junit", default=None)
    parser.add_argument("--tests-log", default=None)
    parser.add_argument("--memcheck-log", default=None)
    parser.add_argument("--racecheck-log", default=None)
    parser.add_argument("--synccheck-log", default=None)
    args = parser.parse_args(argv)
    out_dir = args.out or default_out_dir()

    if args.markdown:
        with open(args.markdown) as f:
            print(markdown_rows(json.load(f)))
        return 0

    if args.finalize:
        report, ok = finalize(out_dir, args.steps, args.build_log, args.junit, args.tests_log, args.memcheck_log,
                              args.racecheck_log, args.synccheck_log)
        print(f"report: {os.path.join(out_dir, REPORT_NAME)} (commit it as "
              f"benchmarks/results/{report.get('suggested_name')})", flush=True)
        print(format_table(report), flush=True)
        return 0 if ok else 1

    cases, problems = load_cases(args.bench_dir)
    if args.only:
        cases = [c for c in cases if args.only in getattr(c, "name", "")]
    report = run_benchmarks(cases, problems, args.device, args.quick, os.path.join(out_dir, REPORT_NAME),
                            args.time_budget, args.case_budget)
    print(format_table(report), flush=True)
    print(f"report: {os.path.join(out_dir, REPORT_NAME)}", flush=True)
    failed = (report.get("bench_state") != "done" or problems
              or any(c.get("status") != "ok" for c in report["cases"]) or not report["cases"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
