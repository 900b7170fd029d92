"""The GPU check without a GPU: its CPU rehearsal end to end (every step through the same code
as on the device), the report parts it writes, the verdict its finalize step gives, the limits
of what the device returns, and the ops script the sanitizers run."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import tarfile
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_gpu_check_{name}", os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def gpu_report(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_cases adds the bench folders
    module = _load("gpu_report")
    yield module
    for name in [n for n in sys.modules if n.startswith("bench_gpucheck_")]:
        del sys.modules[name]


@pytest.fixture
def gpu_finalize(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    return _load("gpu_finalize")


FAKE_BENCH = '''
import torch
from common import Case

def _setup(device):
    return {"x": torch.randn(4096, device=device), "out": torch.empty(4096, device=device)}

def _slow(state):
    state["out"].copy_(state["x"] * 1.0 + 0.0)

def _fast(state):
    torch.mul(state["x"], 1.0, out=state["out"])

def _broken_setup(device):
    raise RuntimeError("setup exploded on purpose")

CASES = [
    Case("fake", "scale 4096 fp32", _setup, _slow, _fast, bytes_moved=lambda s: 2 * 4096 * 4,
         goal="never slower; >= 0.01x", params={"n": 4096, "dtype": "float32"}),
    Case("fake", "broken setup", _broken_setup, _slow, _fast),
    Case("snapshot", "fake snapshot restore", _setup, _slow, _fast, bytes_moved=lambda s: 4096 * 4),
    Case("fake", "cuda only", _setup, _slow, _fast, devices=("cuda",)),
    Case("fake", "large scale", _setup, _slow, _fast, goal="cpu >= 1x", large=True),
]
'''


def _bench_dir(tmp_path, with_problems=True):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "bench_gpucheck_fake.py").write_text(FAKE_BENCH)
    if with_problems:
        (bench / "bench_gpucheck_broken.py").write_text("raise ImportError('no such kernel module')\n")
        (bench / "bench_gpucheck_empty.py").write_text("VALUE = 1\n")
    return bench


def test_quick_cpu_report_schema(gpu_report, tmp_path):
    out = tmp_path / "out"
    rc = gpu_report.main(["--device", "cpu", "--quick", "--bench-dir", str(_bench_dir(tmp_path)), "--out", str(out)])
    assert rc == 1, "a broken case and broken modules must fail the run"
    report = json.loads((out / "gpu_report.json").read_text())

    assert report["schema"] == gpu_report.SCHEMA and report["part"] == "all"
    assert report["device"] == "cpu" and report["torch"] == torch.__version__
    assert report["card"]["name"] and report["created_utc"] and report["bench_state"] == "done"
    assert report["timing"]["clock"] == "time.perf_counter" and report["timing"]["quick"] is True
    assert report["floors"]["device_copy_gbps"] > 0
    assert report["suggested_name"].endswith(".json")

    names = [c["name"] for c in report["cases"]]
    assert names == ["scale 4096 fp32", "broken setup", "fake snapshot restore", "cuda only", "large scale"]
    ok, broken, snap, cuda_only, large = report["cases"]
    assert ok["status"] == "ok" and ok["family"] == "fake" and ok["params"] == {"n": 4096, "dtype": "float32"}
    assert ok["reference_ms"] > 0 and ok["fast_ms"] > 0
    assert math.isclose(ok["ratio"], ok["reference_ms"] / ok["fast_ms"], rel_tol=1e-3)
    assert ok["bytes_moved"] == 2 * 4096 * 4
    assert math.isclose(ok["gbps"], ok["bytes_moved"] / (ok["fast_ms"] / 1e3) / 1e9, rel_tol=1e-3)
    assert math.isclose(ok["pct_copy"], 100 * ok["gbps"] / report["floors"]["device_copy_gbps"], rel_tol=1e-2)
    for side in ("reference", "fast"):
        timing = ok["timing"][side]
        assert timing["repeats"] >= 2 and timing["p10_ms"] <= timing["median_ms"] <= timing["p90_ms"]
    assert [c["measure"] for c in ok["goal_verdict"]["clauses"]] == ["ratio", "ratio"]
    assert ok["goal_verdict"]["met"] == (ok["ratio"] >= 1.0)

    assert broken["status"] == "error" and "setup exploded on purpose" in broken["error"]
    assert snap["status"] == "ok" and snap["host_link"] == "h2d" and snap["pct_host_link"] is None  # no host link on cpu
    # Cases that cannot run here are listed with the reason, not dropped.
    assert cuda_only["status"] == "device only" and "reference_ms" not in cuda_only
    assert large["status"] == "left out (flag)"

    problems = {p["module"]: p["error"] for p in report["import_problems"]}
    assert "no such kernel module" in problems["bench_gpucheck_broken"]
    assert problems["bench_gpucheck_empty"] == "no CASES list"


def test_clean_run_exits_zero_and_only_filters(gpu_report, tmp_path, capsys):
    out = tmp_path / "out"
    bench = _bench_dir(tmp_path, with_problems=False)
    rc = gpu_report.main(["--device", "cpu", "--quick", "--bench-dir", str(bench), "--out", str(out), "--only", "scale"])
    assert rc == 0, "cases left out by a flag do not fail the run"
    report = json.loads((out / "gpu_report.json").read_text())
    assert [(c["name"], c["status"]) for c in report["cases"]] == [
        ("scale 4096 fp32", "ok"), ("large scale", "left out (flag)")]
    table = capsys.readouterr().out
    assert "scale 4096 fp32" in table and "ratio" in table


def test_once_calls_each_side_once_and_large_cases_on_request(gpu_report, tmp_path):
    out = tmp_path / "out"
    bench = _bench_dir(tmp_path, with_problems=False)
    rc = gpu_report.main(["--device", "cpu", "--once", "--bench-dir", str(bench), "--out", str(out), "--only", "scale",
                          "--include-large", "--report-name", "part.json"])
    assert rc == 0
    report = json.loads((out / "part.json").read_text())
    assert report["timing"]["once"] is True
    assert [c["status"] for c in report["cases"]] == ["ok", "ok"]
    assert all(c["timing"][side]["repeats"] == 1 for c in report["cases"] for side in ("reference", "fast"))


def test_parts_split_on_the_cuda_goal(gpu_report, tmp_path):
    cases, problems = gpu_report.load_cases(str(_bench_dir(tmp_path, with_problems=False)))
    assert not problems
    goals = [c.name for c in gpu_report.select_cases(cases, "goals")]
    rest = [c.name for c in gpu_report.select_cases(cases, "rest")]
    # "never slower; >= 0.01x" applies everywhere, "cpu >= 1x" only on the CPU, no goal nowhere.
    assert goals == ["scale 4096 fp32"]
    assert rest == ["broken setup", "fake snapshot restore", "cuda only", "large scale"]
    assert [c.name for c in gpu_report.select_cases(cases, "all", "scale")] == ["scale 4096 fp32", "large scale"]
    with pytest.raises(ValueError, match="part must be one of"):
        gpu_report.select_cases(cases, "some")


def test_spent_time_budget_marks_cases_not_run_without_failing(gpu_report, tmp_path):
    out = tmp_path / "out"
    bench = _bench_dir(tmp_path, with_problems=False)
    rc = gpu_report.main(["--device", "cpu", "--quick", "--bench-dir", str(bench), "--out", str(out),
                          "--time-budget", "0", "--only", "scale"])
    assert rc == 0, "a case left out for time is reported, not a failure"
    report = json.loads((out / "gpu_report.json").read_text())
    assert [c["status"] for c in report["cases"]] == ["not run (time)", "left out (flag)"]


@pytest.mark.parametrize(
    "goal, row, met",
    [
        (">= 3x", {"ratio": 3.2}, True),
        (">= 3x", {"ratio": 2.9}, False),
        ("never slower", {"ratio": 0.99}, False),
        (">= 1.3x; >= 80% of copy", {"ratio": 1.5, "pct_copy": 85.0}, True),
        (">= 1.3x and >= 80% of device bandwidth", {"ratio": 1.5, "pct_copy": 60.0}, False),
        (">= 70% of pinned d2h", {"pct_host_link": 75.0, "pct_copy": 1.0}, True),
        (">= 80% of copy", {"pct_copy": None}, None),
        (">= 0.625x, >= 80% of floor", {"ratio": 0.7, "pct_work_floor": 85.0, "pct_copy": 1.0}, True),
        (">= 0.625x, >= 80% of floor", {"ratio": 0.7, "pct_work_floor": 70.0, "pct_copy": 99.0}, False),
        ("fast enough", {"ratio": 9.0}, None),
        ("", {"ratio": 9.0}, None),
    ],
)
def test_evaluate_goal(gpu_report, goal, row, met):
    assert gpu_report.evaluate_goal(goal, row)["met"] is met


def test_goal_clauses_for_the_other_device_are_left_out(gpu_report):
    goal = "CUDA \u2265 5x; CPU >= 2x"
    assert gpu_report.evaluate_goal(goal, {"ratio": 3.0}, "cpu")["met"] is True
    cuda = gpu_report.evaluate_goal(goal, {"ratio": 3.0}, "cuda")
    assert cuda["met"] is False and [c["need"] for c in cuda["clauses"]] == [5.0]


def test_markdown_rows_come_from_the_report(gpu_report, gpu_finalize, tmp_path):
    out = tmp_path / "out"
    gpu_report.main(["--device", "cpu", "--quick", "--bench-dir", str(_bench_dir(tmp_path)), "--out", str(out)])
    report = json.loads((out / "gpu_report.json").read_text())
    rows = gpu_finalize.markdown_rows(report).splitlines()
    assert len(rows) == len(report["cases"]) == 5
    ok = report["cases"][0]
    assert rows[0].startswith("| fake | scale 4096 fp32 | n=4096, dtype=float32 | ")
    assert f"| {ok['ratio']:.2f}x |" in rows[0] and report["card"]["name"] in rows[0]
    assert "| error |" in rows[1] and "not judged" in rows[1]
    assert "| device only |" in rows[3]


def _results_md_cases():
    """The case names of RESULTS.md's GPU table."""
    with open(os.path.join(BENCHMARKS, "RESULTS.md")) as f:
        text = f.read()
    table = text[text.index("## Cases"):text.index("## Goals not met")]
    return [line.split("|")[2].strip() for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| family") and not line.startswith("|---")]


def test_results_md_lists_exactly_the_cases_that_exist(gpu_report, monkeypatch):
    monkeypatch.delenv("ESPER_LITE_SRC", raising=False)  # the original's side-by-side cases need a checkout
    cases, problems = gpu_report.load_cases()
    assert not problems, problems
    names = [c.name for c in cases]
    assert len(set(names)) == len(names), "two cases share a name"
    listed = _results_md_cases()
    assert sorted(listed) == sorted(names), {"missing from RESULTS.md": sorted(set(names) - set(listed)),
                                             "no such case": sorted(set(listed) - set(names))}
    # The one-shot check leaves the 1B-parameter cases out unless asked for.
    assert {c.name for c in cases if c.large} == {c.name for c in cases if "synthetic-1B" in c.name}


PTXAS_LOG = """\
Cuda compilation tools, release 13.0, V13.0.88
[1/3] /usr/local/cuda/bin/nvcc ... -c csrc/cuda/blend.cu
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z4axpyPfPKffl' for 'sm_90'
ptxas info    : Function properties for _Z4axpyPfPKffl
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 0 barriers
ptxas info    : Compiling entry function '_Z2tkIdEvPT_' for 'sm_90'
ptxas info    : Function properties for _Z2tkIdEvPT_
    16 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 4096 bytes smem, 380 bytes cmem[0]
csrc/cuda/blend.cu(10): warning #177-D: variable "x" was declared but never referenced
"""

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="1" tests="4">
<testcase classname="tests.test_blend" name="test_a[cuda]" time="0.1"/>
<testcase classname="tests.test_blend" name="test_b[cuda]" time="0.1"/>
<testcase classname="tests.test_metrics" name="test_c[cuda]" time="0.1">
  <failure message="AssertionError: 3 != 4">trace</failure></testcase>
<testcase classname="tests.test_snapshot" name="test_d[cuda]" time="0.0">
  <skipped message="needs two GPUs"/></testcase>
</testsuite></testsuites>
"""

MEMCHECK_LOG = """\
========= COMPUTE-SANITIZER
memcheck_ops: check blend_scalar_alpha: ok
memcheck_ops: check snapshot_capture_restore: FAILED TypeError: HostSnapshot has none of ('capture',)
memcheck_ops: 2 checks, 1 failed
========= ERROR SUMMARY: 0 errors
"""

RACECHECK_LOG = """\
========= COMPUTE-SANITIZER
memcheck_ops: check blend_scalar_alpha: ok
memcheck_ops: check metrics_c10: ok
memcheck_ops: 2 checks, 0 failed
========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)
"""

SYNCCHECK_LOG = """\
========= COMPUTE-SANITIZER
memcheck_ops: check blend_scalar_alpha: ok
memcheck_ops: 1 checks, 0 failed
========= ERROR SUMMARY: 0 errors
"""

DRY_SANITIZER_LOG = """\
command: PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python3 benchmarks/memcheck_ops.py
dry run: compute-sanitizer is not available; the ops script runs on the CPU
memcheck_ops: check blend_scalar_alpha: ok
memcheck_ops: 1 checks, 0 failed
"""

PASSING = [("build", "ok", 0), ("tests", "ok", 0), ("memcheck", "ok", 0), ("bench-goals", "ok", 0),
           ("racecheck", "ok", 0), ("synccheck", "ok", 0), ("distributed", "ok", 0), ("bench-rest", "ok", 0)]


def _case(name, status="ok", part="goals", **extra):
    row = {"family": "blend", "name": name, "status": status, "goal": ">= 3x"}
    if status == "ok":
        row.update(reference_ms=2.0, fast_ms=1.0, ratio=2.0, gbps=2000.0, pct_copy=66.7,
                   goal_verdict={"met": False, "clauses": []})
    row.update(extra)
    return row


def _part(cases, state="done", part="goals"):
    return {"torch": "2.11.0", "device": "cuda", "card": {"name": "NVIDIA H100 80GB HBM3"}, "part": part,
            "created_utc": "2026-11-27T10:00:00+00:00", "floors": {"device_copy_gbps": 3000.0},
            "import_problems": [], "bench_state": state, "cases": cases}


def _logs(tmp_path, steps, parts=None, clean=False):
    """A logs folder as gpu_check.sh leaves it: step records, logs, benchmark parts."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "build.log").write_text(PTXAS_LOG.replace("16 bytes stack frame, 8 bytes spill stores", "0 bytes stack "
                                                      "frame, 0 bytes spill stores") if clean else PTXAS_LOG)
    (logs / "tests.log").write_text("gpu-check: 4 cuda tests collected\n")
    (logs / "tests_junit.xml").write_text(JUNIT.replace(
        '<failure message="AssertionError: 3 != 4">trace</failure>', "") if clean else JUNIT)
    (logs / "memcheck.log").write_text(MEMCHECK_LOG.replace(
        "FAILED TypeError: HostSnapshot has none of ('capture',)", "ok").replace("1 failed", "0 failed")
        if clean else MEMCHECK_LOG)
    (logs / "racecheck.log").write_text(RACECHECK_LOG.replace("1 hazard displayed (1 error", "0 hazards displayed (0 errors")
                                        if clean else RACECHECK_LOG)
    (logs / "synccheck.log").write_text(SYNCCHECK_LOG)
    (logs / "steps.tsv").write_text("".join(
        f"{name}\t{status}\t{rc}\t12\t200\t{name}.log\n" for name, status, rc in steps))
    parts = parts if parts is not None else {"goals": [_case("ste 64M")], "rest": [_case("snapshot 1", part="rest")]}
    for part, cases in parts.items():
        (logs / f"bench_{part}.json").write_text(json.dumps(_part(cases, part=part)))
    return logs


def _finalize(gpu_finalize, tmp_path, logs, dry_run=False):
    out = tmp_path / "out"
    return gpu_finalize.finalize(str(out), str(logs), dry_run=dry_run, whole_out=True)


def test_finalize_merges_step_results(gpu_finalize, tmp_path):
    steps = [("build", "ok", 0), ("tests", "failed", 1), ("memcheck", "failed", 1), ("bench-goals", "ok", 0),
             ("racecheck", "failed", 3), ("synccheck", "ok", 0), ("distributed", "ok", 0), ("bench-rest", "ok", 0)]
    report, ok = _finalize(gpu_finalize, tmp_path, _logs(tmp_path, steps))
    out = tmp_path / "out"
    assert ok is False and report["ok"] is False and report["harness_errors"] == []
    assert json.loads((out / "gpu_report.json").read_text())["ok"] is False

    build = report["build"]
    assert build["nvcc"].startswith("13.0") and build["warnings"] == 1
    assert [(k["kernel"], k["registers"], k["spill_stores"], k["smem_bytes"]) for k in build["kernels"]] == [
        ("_Z4axpyPfPKffl", 10, 0, 0), ("_Z2tkIdEvPT_", 255, 8, 4096)]
    assert build["spilling_kernels"] == 1
    assert report["steps"]["build"]["outcome"] == "FAILED", "a spilling kernel fails the build step"

    tests = report["tests"]
    assert (tests["passed"], tests["failed"], tests["errors"], tests["skipped"]) == (2, 1, 0, 1)
    assert tests["cuda_collected"] == 4
    assert tests["failures"] == [{"test": "tests.test_metrics::test_c[cuda]", "kind": "failure",
                                  "message": "AssertionError: 3 != 4"}]
    assert report["steps"]["tests"]["outcome"] == "FAILED"

    memcheck = report["memcheck"]
    assert memcheck["sanitizer"] and memcheck["errors"] == 0 and memcheck["failed_checks"] == ["snapshot_capture_restore"]
    racecheck, synccheck = report["racecheck"], report["synccheck"]
    assert racecheck["errors"] == 1 and not racecheck["failed_checks"]
    assert synccheck["errors"] == 0 and list(synccheck["checks"]) == ["blend_scalar_alpha"]
    outcomes = {name: step["outcome"] for name, step in report["steps"].items()}
    assert outcomes["memcheck"] == outcomes["racecheck"] == "FAILED" and outcomes["synccheck"] == "passed"
    assert outcomes["bench-goals"] == outcomes["bench-rest"] == "passed"
    assert [c["name"] for c in report["cases"]] == ["ste 64M", "snapshot 1"]
    assert [c["part"] for c in report["cases"]] == ["bench-goals", "bench-rest"]

    table = gpu_finalize.format_table(report)
    assert table.splitlines()[-1] == "RESULT: FAIL"
    assert "tests.test_metrics::test_c[cuda]" in table and "ste 64M" in table
    assert "racecheck FAILED (12 s): 1 errors, 2/2 checks" in table and "synccheck passed (12 s)" in table

    # The logs come back bundled: one archive beside the report and the console log.
    with tarfile.open(out / "logs.tar.gz") as bundle:
        assert {"logs/build.log", "logs/tests_junit.xml", "logs/steps.tsv", "logs/bench_goals.json"} <= set(
            bundle.getnames())
    assert sorted(f["name"] for f in report["out_files"]) == ["gpu_report.json", "logs.tar.gz"]


def test_finalize_passes_only_when_every_step_passes(gpu_finalize, tmp_path):
    report, ok = _finalize(gpu_finalize, tmp_path, _logs(tmp_path, PASSING, clean=True))
    assert ok is True, {name: step["outcome"] for name, step in report["steps"].items()}
    assert gpu_finalize.format_table(report).splitlines()[-1] == "RESULT: PASS"


@pytest.mark.parametrize("name", ["build", "tests", "memcheck"])
def test_a_mandatory_step_that_does_not_finish_fails_the_check(gpu_finalize, tmp_path, name):
    for status, rc in (("no-time", -1), ("timeout", 124)):
        steps = [(n, status if n == name else s, rc if n == name else r) for n, s, r in PASSING]
        case = tmp_path / f"{name}-{status}"
        case.mkdir()
        report, ok = _finalize(gpu_finalize, case, _logs(case, steps, clean=True))
        assert ok is False, (name, status)


@pytest.mark.parametrize("name", ["racecheck", "synccheck", "distributed", "bench-rest"])
def test_a_later_step_left_out_for_time_is_reported_not_failed(gpu_finalize, tmp_path, name):
    steps = [(n, "no-time" if n == name else s, -1 if n == name else r) for n, s, r in PASSING]
    parts = {"goals": [_case("ste 64M")]} if name == "bench-rest" else None
    report, ok = _finalize(gpu_finalize, tmp_path, _logs(tmp_path, steps, parts, clean=True))
    assert ok is True and report["steps"][name]["outcome"] == "not run (time)"
    assert f"{name} not run (time)" in gpu_finalize.format_table(report)


def test_a_bench_step_cut_off_by_its_timeout_keeps_its_cases_as_not_run(gpu_finalize, tmp_path):
    steps = [(n, "timeout" if n == "bench-rest" else s, 124 if n == "bench-rest" else r) for n, s, r in PASSING]
    rest = [_case("done", part="rest"), _case("cut", "running"), _case("never reached", "pending")]
    report, ok = _finalize(gpu_finalize, tmp_path, _logs(tmp_path, steps, {"goals": [_case("g")], "rest": rest},
                                                         clean=True))
    assert ok is True
    assert [c["status"] for c in report["cases"]] == ["ok", "ok", "not run (time)", "not run (time)"]
    assert report["steps"]["bench-rest"]["outcome"] == "incomplete (time)"


def test_a_crashed_bench_step_fails_on_the_case_it_was_in(gpu_finalize, tmp_path):
    steps = [(n, "failed" if n == "bench-goals" else s, 139 if n == "bench-goals" else r) for n, s, r in PASSING]
    goals = [_case("ok"), _case("crashed here", "running"), _case("after", "pending")]
    report, ok = _finalize(gpu_finalize, tmp_path, _logs(tmp_path, steps, {"goals": goals, "rest": []}, clean=True))
    assert ok is False
    assert [c["status"] for c in report["cases"]] == ["ok", "error", "error"]
    assert "during this case" in report["cases"][1]["error"]


@pytest.mark.parametrize(
    "breakage, expected",
    [
        ("no record", "distributed: the step left no record"),
        ("command not found", "tests: a command was not found"),
        ("unavailable outside a dry run", "memcheck: 'not available' is only a dry run's sanitizer outcome"),
        ("no part file", "bench-rest: the step ran but left no bench_rest.json"),
        ("module not loaded", "benchmark module bench_x did not load"),
        ("no cuda test", "tests: no CUDA test was collected"),
    ],
)
def test_harness_errors_fail_the_check(gpu_finalize, tmp_path, breakage, expected):
    steps = list(PASSING)
    logs = _logs(tmp_path, steps, clean=True)
    records = (logs / "steps.tsv").read_text().splitlines(keepends=True)
    if breakage == "no record":
        records = [r for r in records if not r.startswith("distributed")]
    elif breakage == "command not found":
        records = [r.replace("tests\tok\t0", "tests\tfailed\t127") for r in records]
    elif breakage == "unavailable outside a dry run":
        records = [r.replace("memcheck\tok\t0", "memcheck\tunavailable\t77") for r in records]
    elif breakage == "no part file":
        (logs / "bench_rest.json").unlink()
    elif breakage == "module not loaded":
        part = json.loads((logs / "bench_goals.json").read_text())
        part["import_problems"] = [{"module": "bench_x", "error": "ImportError: gone"}]
        (logs / "bench_goals.json").write_text(json.dumps(part))
    elif breakage == "no cuda test":
        (logs / "tests.log").write_text("gpu-check: 0 cuda tests collected\n")
    (logs / "steps.tsv").write_text("".join(records))
    report, ok = _finalize(gpu_finalize, tmp_path, logs)
    assert ok is False
    assert any(problem.startswith(expected) for problem in report["harness_errors"]), report["harness_errors"]
    assert "HARNESS: " + expected in gpu_finalize.format_table(report)


def test_dry_run_verdict(gpu_finalize, tmp_path):
    steps = [(n, "unavailable", 77) if n in ("memcheck", "racecheck", "synccheck") else (n, s, r) for n, s, r in PASSING]
    logs = _logs(tmp_path, steps, clean=True)
    for tool in ("memcheck", "racecheck", "synccheck"):
        (logs / f"{tool}.log").write_text(DRY_SANITIZER_LOG)
    report, ok = _finalize(gpu_finalize, tmp_path, logs, dry_run=True)
    assert ok is True and report["dry_run"] is True, report["harness_errors"]
    assert report["steps"]["memcheck"]["outcome"] == "not available"
    assert gpu_finalize.format_table(report).splitlines()[-1] == "RESULT: REHEARSAL PASS"
    # The ops script must have passed on the CPU for "not available" to count.
    (logs / "racecheck.log").write_text(DRY_SANITIZER_LOG.replace("check blend_scalar_alpha: ok", "check x: FAILED boom"))
    report, ok = _finalize(gpu_finalize, tmp_path, logs, dry_run=True)
    assert ok is False and report["steps"]["racecheck"]["outcome"] == "FAILED"
    # A rehearsal runs every step: a skipped one is a harness error.
    (logs / "racecheck.log").write_text(DRY_SANITIZER_LOG)
    (logs / "steps.tsv").write_text((logs / "steps.tsv").read_text().replace("distributed\tok\t0", "distributed\tskipped\t0"))
    report, ok = _finalize(gpu_finalize, tmp_path, logs, dry_run=True)
    assert ok is False and "distributed: skipped, but the rehearsal runs every step" in report["harness_errors"]


def test_cuda_tests_that_skip_for_want_of_a_device_fail_a_real_run(gpu_finalize, tmp_path):
    logs = _logs(tmp_path, PASSING, clean=True)
    (logs / "tests_junit.xml").write_text(JUNIT.replace(
        '<failure message="AssertionError: 3 != 4">trace</failure>', '<skipped message="needs a CUDA device"/>'))
    report, ok = _finalize(gpu_finalize, tmp_path, logs)
    assert ok is False and report["tests"]["skipped_without_cuda"] == 1
    assert report["steps"]["tests"]["detail"] == "1 CUDA tests skipped: no CUDA device"
    with open(os.path.join(ROOT, "tests", "conftest.py")) as f:
        assert f'reason="{gpu_finalize._NO_CUDA}"' in f.read(), "the finalize step reads conftest's skip reason"


def test_tests_summary_falls_back_to_the_log(gpu_finalize, tmp_path):
    log = tmp_path / "tests.log"
    log.write_text("gpu-check: 12 cuda tests collected\n"
                   "FAILED tests/test_x.py::test_y[cuda] - boom\n== 1 failed, 7 passed, 2 skipped in 3.21s ==\n")
    summary = gpu_finalize.summarize_tests(str(tmp_path / "missing.xml"), str(log))
    assert (summary["source"], summary["passed"], summary["failed"], summary["skipped"]) == ("log", 7, 1, 2)
    assert summary["cuda_collected"] == 12
    assert summary["failures"][0]["test"] == "tests/test_x.py::test_y[cuda]"


def test_out_dir_limits_are_the_devices(gpu_finalize, tmp_path):
    out = tmp_path / "out"
    (out / "a" / "b" / "c").mkdir(parents=True)
    for i in range(8):
        (out / f"f{i}.log").write_text("x")
    (out / "a" / "b" / "c" / "deep.log").write_text("x")
    (out / "bad name.txt").write_text("x")
    with open(out / "big.bin", "wb") as f:
        f.truncate(gpu_finalize.OUT_LIMITS["file_bytes"] + 1)
    files, problems = gpu_finalize.check_out_dir(str(out))
    assert len(files) == 11
    text = "\n".join(problems)
    assert "11 files, over 8" in text and "a/b/c/deep.log: more than 2 folders down" in text
    assert "bad name.txt: a name the device does not return" in text and "big.bin:" in text
    files, problems = gpu_finalize.check_out_dir(str(out), ["f0.log", "f1.log", "missing.json"])
    assert [f["name"] for f in files] == ["f0.log", "f1.log"] and problems == []


def test_bundled_logs_keep_the_end_of_a_long_log(gpu_finalize, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_finalize, "LOG_KEEP_BYTES", 100)
    logs, out = tmp_path / "logs", tmp_path / "out"
    logs.mkdir()
    out.mkdir()
    (logs / "tests.log").write_text("early line\n" * 50 + "THE END\n")
    path = gpu_finalize.bundle_logs(str(logs), str(out))
    with tarfile.open(path) as bundle:
        text = bundle.extractfile("logs/tests.log").read().decode()
    assert text.startswith("[... cut: the last 100 of") and text.endswith("THE END\n")


def test_gpu_check_script_parses():
    done = subprocess.run(["bash", "-n", os.path.join(BENCHMARKS, "gpu_check.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the rehearsal is for machines without a GPU")
def test_the_gpu_check_rehearsal_passes_every_step(tmp_path, gpu_report, gpu_finalize, monkeypatch):
    """GPU_CHECK_DRY_RUN=1: every step of benchmarks/gpu_check.sh through the same code."""
    monkeypatch.delenv("ESPER_LITE_SRC", raising=False)
    import esper_fast

    extension = esper_fast.extension_path()
    built = os.stat(extension).st_mtime_ns
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK_", "ESPER_LITE_SRC"))}
    env.update(GPU_CHECK_DRY_RUN="1", OUT=str(out), PYTHON=sys.executable)
    done = subprocess.run(["bash", os.path.join(BENCHMARKS, "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=1800)
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-6000:]
    assert console.rstrip().splitlines()[-2] == "RESULT: REHEARSAL PASS", console[-3000:]

    report = json.loads((out / "gpu_report.json").read_text())
    assert report["dry_run"] is True and report["ok"] is True and report["harness_errors"] == []
    outcomes = {name: step["outcome"] for name, step in report["steps"].items()}
    assert outcomes == {"build": "passed", "tests": "passed", "memcheck": "not available", "bench-goals": "passed",
                        "racecheck": "not available", "synccheck": "not available", "distributed": "passed",
                        "bench-rest": "passed"}
    assert report["tests"]["cuda_collected"] > 0 and report["tests"]["passed"] > 0
    assert report["tests"]["failed"] == report["tests"]["errors"] == 0
    for tool in ("memcheck", "racecheck", "synccheck"):
        assert report[tool]["ops_finished"] and report[tool]["checks"] and not report[tool]["failed_checks"]

    # Every case is listed once: the CPU-capable ones ran once, the others say why not.
    cases, _ = gpu_report.load_cases()
    rows = {row["name"]: row for row in report["cases"]}
    assert sorted(rows) == sorted(c.name for c in cases)
    for case in cases:
        expected = "ok" if "cpu" in case.devices and not case.large else "device only"
        assert rows[case.name]["status"] == expected, (case.name, rows[case.name].get("error"))
        assert rows[case.name]["part"] == ("bench-goals" if case.gpu_goal else "bench-rest")

    # The distributed ranks imported esper_fast from the copy, not through the editable install.
    files = report["distributed"]["results"]["collectives"]["esper_fast_files"]
    assert files and all(os.path.realpath(ROOT) not in os.path.realpath(f) for f in files)

    # What the device would return fits its limits.
    assert sorted(os.listdir(out)) == ["gpu_check.log", "gpu_report.json", "logs.tar.gz"]
    files, problems = gpu_finalize.check_out_dir(str(out))
    assert problems == [] and len(files) <= gpu_finalize.OUT_LIMITS["files"]
    # The suite's own extension was reused, not deleted or rebuilt.
    assert report["steps"]["build"]["detail"] == "the installed extension, reused"
    assert os.stat(extension).st_mtime_ns == built


def test_memcheck_script_runs_on_the_cpu_kernels(capsys):
    memcheck = _load("memcheck_ops")
    assert memcheck.main(["--device", "cpu", "--checks", "metrics_c10,ste"]) == 0
    printed = capsys.readouterr().out
    assert "check metrics_c10: ok" in printed and "check ste_forward_backward: ok" in printed
    assert "memcheck_ops: 2 checks, 0 failed" in printed
    assert memcheck.main(["--device", "cpu", "--checks", "no_such_check"]) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_memcheck_script_fails_without_cuda(capsys):
    memcheck = _load("memcheck_ops")
    assert len(memcheck.CHECKS) >= 6
    assert memcheck.main() == 1
    assert "CUDA is not available" in capsys.readouterr().out


class _CountingAccumulator:
    """Stands in for MetricsAccumulator with its contract's signature; counts argmax hits."""

    def __init__(self, num_classes, device, per_class=False, ignore_index=-100):
        self.correct, self.offset = 0, 0

    def update(self, logits, targets, loss=None):
        self.correct += int((logits.argmax(1) == targets).sum()) + self.offset

    def compute(self):
        return types.SimpleNamespace(correct=self.correct, total=None)


class _ClonedSnapshot:
    """Stands in for HostSnapshot: capture() keeps copies, restore() writes them back."""

    def __init__(self, *, device_resident=False):
        self.saved = None

    def capture(self, tensors, *, non_blocking=False):
        values = tensors.values() if isinstance(tensors, dict) else tensors
        self.saved = [t.clone() if isinstance(t, torch.Tensor) else t for t in values]

    def restore(self, tensors, *, non_blocking=False):
        values = tensors.values() if isinstance(tensors, dict) else tensors
        for t, s in zip(values, self.saved):
            if isinstance(t, torch.Tensor):
                t.copy_(s)


def test_memcheck_checks_follow_the_op_contract_on_cpu(monkeypatch):
    import esper_fast.ops

    memcheck = _load("memcheck_ops")
    monkeypatch.setattr(memcheck, "DEVICE", "cpu")
    monkeypatch.setattr(esper_fast.ops, "MetricsAccumulator", _CountingAccumulator)
    monkeypatch.setattr(esper_fast.ops, "HostSnapshot", _ClonedSnapshot)
    for fn in memcheck.CHECKS:
        fn()

    class WrongCount(_CountingAccumulator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.offset = 1

    class NoRestore(_ClonedSnapshot):
        def restore(self, tensors, *, non_blocking=False):
            pass

    monkeypatch.setattr(esper_fast.ops, "MetricsAccumulator", WrongCount)
    monkeypatch.setattr(esper_fast.ops, "HostSnapshot", NoRestore)
    with pytest.raises(AssertionError, match="argmax count"):
        memcheck.metrics_c10()
    with pytest.raises(AssertionError, match="not restored bit for bit"):
        memcheck.snapshot_capture_restore()
    with pytest.raises(AssertionError, match="not restored bit for bit"):
        memcheck.snapshot_mapping_async_device_resident()
