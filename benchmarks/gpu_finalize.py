"""Merges the GPU check's steps into one report, bundles their logs and gives the verdict.

``python3 benchmarks/gpu_finalize.py --out DIR --logs LOGS [--dry-run] [--whole-out]``
    Run by ``benchmarks/gpu_check.sh`` after its steps. Reads from ``LOGS`` the step records
    (``steps.tsv``), the build log (ptxas registers and spills), the test results (junit xml),
    the compute-sanitizer logs, the benchmark parts (``bench_goals.json``, ``bench_rest.json``)
    and the distributed step's numbers; writes ``DIR/gpu_report.json`` and ``DIR/logs.tar.gz``
    (every log, each cut to its last :data:`LOG_KEEP_BYTES`), checks that what ``DIR`` holds
    fits what the device machine returns (:data:`OUT_LIMITS`), prints the table and exits 0
    only when the check passed.

``python3 benchmarks/gpu_finalize.py --markdown REPORT``
    Prints RESULTS.md's table rows for a committed report.

The verdict. Build, tests and memcheck are mandatory: each must run to its end and pass. The
other steps (the benchmark cases with a CUDA goal, racecheck, synccheck, the distributed step,
the remaining cases) run with the time left: a step or case left out for time is reported as
"not run (time)" and does not fail the check; one that runs and fails does. A harness error (a
step without a record, a command not found, a benchmark module that does not load, no CUDA
test collected, more files than the device returns) fails it whatever the kernels did.

``--dry-run`` judges the CPU rehearsal (``GPU_CHECK_DRY_RUN=1``): every step must have run
and passed through the same code, except that compute-sanitizer is "not available" there; the
sanitizer steps then must show their ops script passing on the CPU.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ElementTree

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from report_format import (  # noqa: E402
    ERROR,
    NOT_RUN_TIME,
    OK,
    PENDING,
    QUIET_STATUSES,
    REPORT_NAME,
    RUNNING,
    SCHEMA,
    format_table,
    markdown_rows,
    now_utc,
    suggested_name,
    write_json,
)

# The steps of gpu_check.sh in the order they run, and those that must pass.
STEPS = ("build", "tests", "memcheck", "bench-goals", "racecheck", "synccheck", "distributed", "bench-rest")
MANDATORY = ("build", "tests", "memcheck")
SANITIZER_STEPS = ("memcheck", "racecheck", "synccheck")
BENCH_PARTS = {"bench-goals": "bench_goals.json", "bench-rest": "bench_rest.json"}
BUNDLE_NAME = "logs.tar.gz"
LOG_KEEP_BYTES = 4 * 2**20

# What the device machine returns from $OUT.
OUT_LIMITS = {"files": 8, "file_bytes": 16 * 2**20, "total_bytes": 64 * 2**20, "depth": 2}
_OUT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")

# Exit statuses of a step that mean its command could not run at all.
_NOT_RUNNABLE = {126: "a command is not executable", 127: "a command was not found"}

PASSED, FAILED, NOT_AVAILABLE, SKIPPED = "passed", "FAILED", "not available", "skipped"
INCOMPLETE_TIME = "incomplete (time)"


# ----------------------------------------------------------------------------- step records

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


_COLLECTED = re.compile(r"^gpu-check: (\d+) cuda tests collected", re.M)
_NO_CUDA = "needs a CUDA device"  # tests/conftest.py's skip reason


def summarize_tests(junit_path: str | None, log_path: str | None = None) -> dict:
    """Counts and failing test names from pytest's junit xml (the log's last line otherwise),
    and how many CUDA tests the step collected (its ``gpu-check: N cuda tests collected`` line)."""
    summary = {"source": None, "total": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [],
               "cuda_collected": None, "skipped_without_cuda": 0}
    lines = []
    if log_path and os.path.exists(log_path):
        with open(log_path, errors="replace") as f:
            text = f.read()
        lines = text.splitlines()
        collected = _COLLECTED.search(text)
        summary["cuda_collected"] = int(collected.group(1)) if collected else None
    if junit_path and os.path.exists(junit_path):
        try:
            root = ElementTree.parse(junit_path).getroot()
        except ElementTree.ParseError:
            root = None
        if root is not None:
            for case in root.iter("testcase"):
                summary["total"] += 1
                outcome, message = "passed", []
                for child in case:
                    if child.tag in ("failure", "error", "skipped"):
                        outcome = child.tag
                        message = (child.get("message") or child.text or "").strip().splitlines()
                        break
                if outcome == "passed":
                    summary["passed"] += 1
                elif outcome == "skipped":
                    summary["skipped"] += 1
                    summary["skipped_without_cuda"] += any(_NO_CUDA in line for line in message)
                else:
                    summary["failed" if outcome == "failure" else "errors"] += 1
                    name = f"{case.get('classname', '')}::{case.get('name', '')}"
                    summary["failures"].append({"test": name, "kind": outcome,
                                                "message": (message[0] if message else "")[:300]})
            summary["source"] = "junit"
            return summary
    for line in reversed(lines):
        if re.search(r"\b(passed|failed|error|errors|skipped|deselected|no tests ran)\b", line) and " in " in line:
            for count, word in re.findall(r"(\d+) (passed|failed|errors?|skipped)", line):
                summary[{"error": "errors"}.get(word, word)] = int(count)
            summary["total"] = summary["passed"] + summary["failed"] + summary["errors"] + summary["skipped"]
            summary["source"] = "log"
            break
    summary["failures"] = [{"test": line.split(" ", 1)[1].split(" - ")[0], "kind": "failure", "message": ""}
                           for line in lines if line.startswith(("FAILED ", "ERROR "))][:50]
    return summary


_CHECK_LINE = re.compile(r"^memcheck_ops: check (\S+): (ok|FAILED)(.*)$")
_OPS_SUMMARY = re.compile(r"^memcheck_ops: (\d+) checks, (\d+) failed", re.M)


def summarize_sanitizer(log_path: str | None) -> dict:
    """compute-sanitizer's error count and memcheck_ops.py's per-check results (any tool's log:
    memcheck and synccheck end with an ERROR SUMMARY, racecheck with a RACECHECK SUMMARY)."""
    summary = {"sanitizer": False, "errors": None, "checks": {}, "failed_checks": [], "ops_finished": False}
    if not log_path or not os.path.exists(log_path):
        return summary
    with open(log_path, errors="replace") as f:
        text = f.read()
    summary["ops_finished"] = bool(_OPS_SUMMARY.search(text))
    for line in text.splitlines():
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


# ----------------------------------------------------------------------------- benchmark parts

def merge_parts(logs: str, steps: dict, harness: list[str]) -> dict:
    """The benchmark parts' reports as one: the first part's environment and floors, every
    part's cases in order. A case cut off (running or not yet reached when the process ended)
    is "not run (time)" when its step ran out of time, else an error: the process crashed."""
    report = {"cases": [], "import_problems": [], "bench_states": []}
    for step, name in BENCH_PARTS.items():
        status = steps.get(step, {}).get("status")
        path = os.path.join(logs, name)
        if not os.path.exists(path):
            if status in ("ok", "failed", "timeout"):
                harness.append(f"{step}: the step ran but left no {name}")
            continue
        try:
            with open(path) as f:
                part = json.load(f)
        except (OSError, ValueError) as exc:
            harness.append(f"{step}: {name} is unreadable ({exc})")
            continue
        for key, value in part.items():
            if key not in ("cases", "import_problems", "bench_state", "part"):
                report.setdefault(key, value)
        if not report["import_problems"]:
            report["import_problems"] = part.get("import_problems", [])
        state = part.get("bench_state")
        if state != "done":
            report["bench_states"].append(f"{step} ended while {state}")
        for row in part.get("cases", []):
            if row.get("status") in (RUNNING, PENDING):
                if status == "timeout":
                    row.update(status=NOT_RUN_TIME, error="the step's time ran out before this case ended")
                elif row["status"] == RUNNING:
                    row.update(status=ERROR, error="the benchmark process ended during this case (crash)")
                else:
                    row.update(status=ERROR, error="the benchmark process ended before this case (crash)")
            row["part"] = step
            report["cases"].append(row)
    for problem in report["import_problems"]:
        harness.append(f"benchmark module {problem.get('module')} did not load: "
                       f"{(problem.get('error') or '').strip().splitlines()[-1:]}")
    return report


# ----------------------------------------------------------------------------- verdicts

def _step_outcome(name: str, step: dict | None, dry_run: bool, harness: list[str]) -> str:
    """What a step's record says before its content is judged."""
    if step is None:
        harness.append(f"{name}: the step left no record")
        return "missing"
    status, rc = step.get("status"), step.get("rc")
    if rc in _NOT_RUNNABLE:
        harness.append(f"{name}: {_NOT_RUNNABLE[rc]} (exit {rc}); see its log")
        return FAILED
    if status == "skipped":
        if dry_run:
            harness.append(f"{name}: skipped, but the rehearsal runs every step")
        return SKIPPED
    if status == "no-time":
        return NOT_RUN_TIME
    if status == "timeout":
        return INCOMPLETE_TIME
    if status == "unavailable":
        if not dry_run or name not in SANITIZER_STEPS:
            harness.append(f"{name}: 'not available' is only a dry run's sanitizer outcome")
            return FAILED
        return NOT_AVAILABLE
    if status == "ok":
        return PASSED
    if status == "failed":
        return FAILED
    harness.append(f"{name}: unknown status {status!r}")
    return FAILED


def judge(steps: dict, summaries: dict, cases: list[dict], dry_run: bool, harness: list[str]) -> dict:
    """Each step's outcome and detail, from its record and what its log or report says."""
    judged = {}
    for name in STEPS:
        step = steps.get(name)
        outcome = _step_outcome(name, step, dry_run, harness)
        detail = ""
        if name == "build" and outcome == PASSED:
            build = summaries["build"]
            detail = "the installed extension, reused" if dry_run else f"{len(build['kernels'])} kernels (ptxas)"
            if build.get("spilling_kernels"):
                outcome, detail = FAILED, f"{build['spilling_kernels']} kernels spill registers"
        elif name == "tests" and outcome in (PASSED, FAILED):
            tests = summaries["tests"]
            detail = (f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                      f"{tests['skipped']} skipped; {tests['cuda_collected']} cuda tests collected")
            if not tests["cuda_collected"]:
                harness.append("tests: no CUDA test was collected")
                outcome = FAILED
            elif outcome == PASSED and (tests["passed"] == 0 or tests["failed"] or tests["errors"]):
                outcome = FAILED
            elif outcome == PASSED and not dry_run and tests["skipped_without_cuda"]:
                outcome, detail = FAILED, f"{tests['skipped_without_cuda']} CUDA tests skipped: no CUDA device"
        elif name in SANITIZER_STEPS and outcome in (PASSED, FAILED, NOT_AVAILABLE):
            tool = summaries[name]
            checks = tool["checks"]
            detail = (f"{'?' if tool['errors'] is None else tool['errors']} errors, "
                      f"{len(checks) - len(tool['failed_checks'])}/{len(checks)} checks")
            if outcome == NOT_AVAILABLE:
                detail = f"ops on the CPU: {len(checks) - len(tool['failed_checks'])}/{len(checks)} checks"
                if not (tool["ops_finished"] and checks and not tool["failed_checks"]):
                    outcome = FAILED
            elif outcome == PASSED and not (tool["sanitizer"] and tool["errors"] == 0 and checks
                                            and not tool["failed_checks"]):
                outcome = FAILED
        elif name in BENCH_PARTS and outcome in (PASSED, FAILED, INCOMPLETE_TIME):
            mine = [c for c in cases if c.get("part") == name]
            counts = {}
            for case in mine:
                counts[case.get("status")] = counts.get(case.get("status"), 0) + 1
            detail = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no cases"
            errors = [c for c in mine if c.get("status") not in (OK, *QUIET_STATUSES)]
            if errors:
                outcome = FAILED
            if dry_run and any(c.get("status") == NOT_RUN_TIME for c in mine):
                harness.append(f"{name}: the rehearsal left cases not run for time")
        judged[name] = {**(step or {}), "outcome": outcome, "detail": detail, "mandatory": name in MANDATORY}
    return judged


def verdict(judged: dict, dry_run: bool, harness: list[str]) -> bool:
    if harness:
        return False
    for name, step in judged.items():
        outcome = step["outcome"]
        if dry_run:
            allowed = (PASSED, NOT_AVAILABLE) if name in SANITIZER_STEPS else (PASSED,)
        elif step["mandatory"]:
            allowed = (PASSED, SKIPPED)
        else:
            allowed = (PASSED, SKIPPED, NOT_RUN_TIME, INCOMPLETE_TIME)
        if outcome not in allowed:
            return False
    return True


# ----------------------------------------------------------------------------- what comes back

def bundle_logs(logs: str, out: str) -> str:
    """Every file of ``logs`` into ``out/logs.tar.gz``; a log over LOG_KEEP_BYTES keeps its end."""
    path = os.path.join(out, BUNDLE_NAME)
    with tarfile.open(path, "w:gz") as bundle:
        for name in sorted(os.listdir(logs)):
            source = os.path.join(logs, name)
            if not os.path.isfile(source):
                continue
            size = os.path.getsize(source)
            with open(source, "rb") as f:
                if size > LOG_KEEP_BYTES:
                    f.seek(size - LOG_KEEP_BYTES)
                    data = b"[... cut: the last %d of %d bytes follow]\n" % (LOG_KEEP_BYTES, size) + f.read()
                else:
                    data = f.read()
            info = tarfile.TarInfo(f"logs/{name}")
            info.size = len(data)
            info.mtime = int(os.path.getmtime(source))
            bundle.addfile(info, io.BytesIO(data))
    return path


def check_out_dir(out: str, names: list[str] | None = None) -> tuple[list[dict], list[str]]:
    """The files under ``out`` (or only ``names`` in it) and every way they break OUT_LIMITS."""
    problems, files = [], []
    if names is None:
        entries = []
        for folder, dirs, filenames in os.walk(out):
            depth = os.path.relpath(folder, out).count(os.sep) + (folder != out)
            for name in dirs + filenames:
                entries.append((os.path.join(folder, name), depth))
    else:
        entries = [(os.path.join(out, n), 0) for n in names if os.path.lexists(os.path.join(out, n))]
    for path, depth in entries:
        rel = os.path.relpath(path, out)
        if not _OUT_NAME.match(os.path.basename(path)):
            problems.append(f"{rel}: a name the device does not return")
        if os.path.islink(path):
            problems.append(f"{rel}: a link (not returned)")
            continue
        if os.path.isdir(path):
            continue
        if depth > OUT_LIMITS["depth"]:
            problems.append(f"{rel}: more than {OUT_LIMITS['depth']} folders down")
        size = os.path.getsize(path)
        files.append({"name": rel, "bytes": size})
        if size > OUT_LIMITS["file_bytes"]:
            problems.append(f"{rel}: {size} bytes, over {OUT_LIMITS['file_bytes']}")
    if len(files) > OUT_LIMITS["files"]:
        problems.append(f"{len(files)} files, over {OUT_LIMITS['files']}")
    total = sum(f["bytes"] for f in files)
    if total > OUT_LIMITS["total_bytes"]:
        problems.append(f"{total} bytes in all, over {OUT_LIMITS['total_bytes']}")
    return files, problems


# ----------------------------------------------------------------------------- finalize

def finalize(out: str, logs: str, dry_run: bool = False, whole_out: bool = False) -> tuple[dict, bool]:
    """Merge, bundle, check, write ``out/gpu_report.json``; returns the report and the verdict."""
    os.makedirs(out, exist_ok=True)
    harness: list[str] = []
    log = lambda name: os.path.join(logs, name)  # noqa: E731
    steps = read_steps(log("steps.tsv"))
    report = merge_parts(logs, steps, harness)
    if "torch" not in report:
        report.update(_environment_without_bench())
    report["schema"] = SCHEMA
    report["dry_run"] = dry_run
    report["finalized_utc"] = now_utc()
    report.setdefault("suggested_name", suggested_name(report))
    summaries = {
        "build": summarize_build(log("build.log")),
        "tests": summarize_tests(log("tests_junit.xml"), log("tests.log")),
        **{name: summarize_sanitizer(log(f"{name}.log")) for name in SANITIZER_STEPS},
    }
    distributed = {"results": None}
    if os.path.exists(log("distributed.json")):
        with open(log("distributed.json")) as f:
            distributed["results"] = json.load(f)
    judged = judge(steps, summaries, report["cases"], dry_run, harness)
    report.update(summaries, distributed=distributed, steps=judged, emulation=emulation_coverage())
    report["ok"] = False
    report["harness_errors"] = harness
    path = os.path.join(out, REPORT_NAME)
    write_json(path, report)  # a first version, in case the bundling below fails
    bundle_logs(logs, out)
    ours = [REPORT_NAME, BUNDLE_NAME, "gpu_check.log"]
    report["out_files"], problems = check_out_dir(out, None if whole_out else ours)
    harness.extend(f"OUT: {p}" for p in problems)
    report["ok"] = verdict(judged, dry_run, harness)
    write_json(path, report)
    return report, report["ok"]


def emulation_coverage() -> dict | None:
    """The kernel paths the CPU emulation verifies on every CI run, and what it leaves to this
    run (tests/emulation/emulated_paths.py); None where the checkout lacks it."""
    path = os.path.join(HERE, "..", "tests", "emulation", "emulated_paths.py")
    if not os.path.exists(path):
        return None
    namespace: dict = {}
    with open(path) as f:
        exec(compile(f.read(), path, "exec"), namespace)  # plain data, no imports
    return {"verified_by_emulation": namespace["VERIFIED"], "device_only": namespace["DEVICE_ONLY"]}


def _environment_without_bench() -> dict:
    """The environment when no benchmark part ran (the report's header still needs it)."""
    try:
        import gpu_report

        return gpu_report.environment("cuda")
    except Exception as exc:  # noqa: BLE001  (the report must say why, not crash)
        return {"environment_error": f"{type(exc).__name__}: {exc}", "created_utc": now_utc()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"),
                        help="the folder the device returns ($OUT)")
    parser.add_argument("--logs", help="the folder of the steps' logs and records")
    parser.add_argument("--dry-run", action="store_true", help="judge the CPU rehearsal")
    parser.add_argument("--whole-out", action="store_true",
                        help="check every file under --out against the device's limits, not only the check's own")
    parser.add_argument("--markdown", metavar="REPORT", help="print RESULTS.md table rows for a report file, then exit")
    args = parser.parse_args(argv)
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown_rows(json.load(f)))
        return 0
    if not args.logs:
        parser.error("--logs is required")
    report, ok = finalize(args.out, args.logs, args.dry_run, args.whole_out)
    print(f"report: {os.path.join(args.out, REPORT_NAME)} (commit it as "
          f"benchmarks/results/{report.get('suggested_name')}), logs: {os.path.join(args.out, BUNDLE_NAME)}",
          flush=True)
    print(format_table(report), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
