"""The GPU report's file format and its printed forms, shared by the measuring side
(``gpu_report.py``) and the merging side (``gpu_finalize.py``).

A report is one JSON object (schema :data:`SCHEMA`): the environment (card, torch, CUDA), the
copy-bandwidth floors, one row per benchmark case, and, once ``gpu_check.sh`` has finalized
it, each step's outcome and the verdict.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re

SCHEMA = "esper_fast.gpu_report/2"
REPORT_NAME = "gpu_report.json"

# A case row's status. Only "error" (and "running", a case cut off by a crash) is a failure;
# the others say why a case has no timing.
OK = "ok"
ERROR = "error"
RUNNING = "running"
PENDING = "pending"  # listed before the run starts, so a killed run still names every case
NOT_RUN_TIME = "not run (time)"
LEFT_OUT_FLAG = "left out (flag)"
DEVICE_ONLY = "device only"
NOT_RUN_CONTEXT = "not run (CUDA context lost)"
QUIET_STATUSES = (NOT_RUN_TIME, LEFT_OUT_FLAG, DEVICE_ONLY)


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def write_json(path: str, data: dict) -> None:
    """Write atomically: a reader (or a killed run) never sees half a report."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)


def suggested_name(report: dict) -> str:
    """``<date>_<card>.json``: the name under benchmarks/results/ when the report is committed."""
    card = (report.get("card") or {}).get("name") or report.get("device", "unknown")
    date = (report.get("created_utc") or now_utc())[:10]
    return f"{date}_{re.sub(r'[^A-Za-z0-9.]+', '-', card).strip('-')}.json"


def fmt(value, spec: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def _floor_text(row: dict) -> str:
    pct = row.get("pct_host_link") if row.get("host_link") else row.get("pct_copy")
    if pct is not None:
        return f"{pct:.0f}%{'h' if row.get('host_link') else 'c'}"
    if row.get("pct_work_floor") is not None:
        return f"{row['pct_work_floor']:.0f}%w"
    return "-"


def format_table(report: dict) -> str:
    """The short table printed last: one line per case, then the steps and the verdict."""
    card = (report.get("card") or {}).get("name") or report.get("device", "?")
    floors = report.get("floors") or {}
    lines = [
        f"esper_fast {report.get('device', '?')} report: {card}; torch {report.get('torch')} "
        f"(CUDA {report.get('cuda')}); {report.get('created_utc')}",
        "floors: copy {} GB/s (read+write){}".format(
            fmt(floors.get("device_copy_gbps"), ".1f"),
            "; pinned D2H {} GB/s, H2D {} GB/s, pageable D2H {} GB/s".format(
                fmt(floors.get("d2h_pinned_gbps"), ".1f"), fmt(floors.get("h2d_pinned_gbps"), ".1f"),
                fmt(floors.get("d2h_pageable_gbps"), ".1f")) if "d2h_pinned_gbps" in floors else ""),
    ]
    if "error" in floors:
        lines.append(f"floors: ERROR {floors['error'].splitlines()[-1]}")
    if (report.get("timing") or {}).get("once"):
        lines.append("timings: one call per side, a rehearsal of the path: not a measurement")
    header = f"{'family':<11}{'case':<44}{'ref ms':>10}{'fast ms':>10}{'ratio':>9}{'GB/s':>9}{'%floor':>8}  {'goal':<20}met"
    lines += [header, "-" * len(header)]
    for row in report.get("cases", []):
        name = row.get("name", "?")
        name = name if len(name) <= 43 else name[:40] + "..."
        if row.get("status") != OK:
            first = (row.get("error") or "").strip().splitlines()
            detail = f": {first[-1][:70]}" if first else ""
            lines.append(f"{row.get('family', '?'):<11}{name:<44}{row.get('status', '?').upper()}{detail}")
            continue
        met = {True: "yes", False: "NO", None: "-"}[(row.get("goal_verdict") or {}).get("met")]
        goal = row.get("goal") or "-"
        lines.append(f"{row.get('family', '?'):<11}{name:<44}{fmt(row.get('reference_ms'), '10.3f'):>10}"
                     f"{fmt(row.get('fast_ms'), '10.3f'):>10}{fmt(row.get('ratio'), '.2f') + 'x':>9}"
                     f"{fmt(row.get('gbps'), '.1f'):>9}{_floor_text(row):>8}  {goal[:15]:<16}{met}")
    for state in report.get("bench_states", []):
        lines.append(f"benchmarks: {state}")
    for problem in report.get("import_problems", []):
        last = (problem.get("error") or "").strip().splitlines()
        lines.append(f"IMPORT {problem.get('module')}: {(last[-1] if last else '')[:90]}")
    lines.append("%floor: c = of the device copy, h = of the pinned host link (snapshot cases), "
                 "w = the least work timed alike (validation cases)")
    emulation = report.get("emulation")
    if emulation:
        lines.append("verified on CPU by the emulation (CI): " + ", ".join(emulation["verified_by_emulation"]))
        lines.append("left to this run: " + "; ".join(item.split(" (")[0] for item in emulation["device_only"]))
    if "steps" in report:
        lines += _steps_lines(report)
        lines.append(f"RESULT: {verdict_word(report)}")
    return "\n".join(lines)


def verdict_word(report: dict) -> str:
    if report.get("dry_run"):
        return "REHEARSAL PASS" if report.get("ok") else "REHEARSAL FAIL"
    return "PASS" if report.get("ok") else "FAIL"


def _steps_lines(report: dict) -> list[str]:
    steps = report.get("steps", {})
    parts = []
    for name, step in steps.items():
        seconds = step.get("seconds")
        text = f"{name} {step.get('outcome', step.get('status', '?'))}"
        if seconds is not None and step.get("status") not in ("skipped", "no-time"):
            text += f" ({seconds:.0f} s)"
        if step.get("detail"):
            text += f": {step['detail']}"
        parts.append(text)
    lines = ["steps: " + " | ".join(parts)]
    failing = [f["test"] for f in (report.get("tests") or {}).get("failures", [])][:10]
    if failing:
        lines.append("failed tests: " + ", ".join(failing))
    for problem in report.get("harness_errors", []):
        lines.append(f"HARNESS: {problem}")
    return lines


def markdown_rows(report: dict) -> str:
    """RESULTS.md's table rows for a committed report, so that no number is typed by hand."""
    card = (report.get("card") or {}).get("name") or report.get("device", "?")
    source = report.get("suggested_name", "?")
    lines = []
    for row in report.get("cases", []):
        params = ", ".join(f"{k}={v}" for k, v in (row.get("params") or {}).items()) or "-"
        if row.get("status") != OK:
            lines.append(f"| {row.get('family')} | {row.get('name')} | {params} | {row.get('status')} "
                         f"| | | | | {row.get('goal') or '-'} | not judged | {card} | {source} |")
            continue
        if row.get("host_link") and row.get("pct_host_link") is not None:
            floor = f"{row['pct_host_link']:.0f}% of pinned {row['host_link'].upper()}"
        elif row.get("pct_copy") is not None:
            floor = f"{row['pct_copy']:.0f}% of copy"
        elif row.get("pct_work_floor") is not None:
            floor = f"{row['pct_work_floor']:.0f}% of the work floor"
        else:
            floor = "-"
        met = {True: "met", False: "not met", None: "not judged"}[(row.get("goal_verdict") or {}).get("met")]
        lines.append(f"| {row.get('family')} | {row.get('name')} | {params} | {fmt(row.get('reference_ms'), '.4f')} "
                     f"| {fmt(row.get('fast_ms'), '.4f')} | {fmt(row.get('ratio'), '.2f')}x "
                     f"| {fmt(row.get('gbps'), '.1f')} | {floor} | {row.get('goal') or '-'} | {met} | {card} | {source} |")
    return "\n".join(lines)
