"""The GPU check's parts that need no GPU: the report schema from a quick CPU run over
injected cases, the step summaries it merges, goal judging, and the shell script's syntax."""

import importlib.util
import json
import math
import os
import subprocess
import sys
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

    assert report["schema"] == gpu_report.SCHEMA
    assert report["device"] == "cpu" and report["torch"] == torch.__version__
    assert report["card"]["name"] and report["created_utc"] and report["bench_state"] == "done"
    assert report["timing"]["clock"] == "time.perf_counter" and report["timing"]["quick"] is True
    assert report["floors"]["device_copy_gbps"] > 0
    assert report["suggested_name"].endswith(".json")

    names = [c["name"] for c in report["cases"]]
    assert names == ["scale 4096 fp32", "broken setup", "fake snapshot restore"], "cuda-only cases are not timed on cpu"
    ok, broken, snap = report["cases"]
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

    problems = {p["module"]: p["error"] for p in report["import_problems"]}
    assert "no such kernel module" in problems["bench_gpucheck_broken"]
    assert problems["bench_gpucheck_empty"] == "no CASES list"


def test_clean_run_exits_zero_and_only_filters(gpu_report, tmp_path, capsys):
    out = tmp_path / "out"
    bench = _bench_dir(tmp_path, with_problems=False)
    rc = gpu_report.main(["--device", "cpu", "--quick", "--bench-dir", str(bench), "--out", str(out), "--only", "scale"])
    assert rc == 0
    report = json.loads((out / "gpu_report.json").read_text())
    assert [c["name"] for c in report["cases"]] == ["scale 4096 fp32"]
    table = capsys.readouterr().out
    assert "scale 4096 fp32" in table and "ratio" in table


def test_spent_time_budget_marks_cases_not_run(gpu_report, tmp_path):
    out = tmp_path / "out"
    bench = _bench_dir(tmp_path, with_problems=False)
    rc = gpu_report.main(["--device", "cpu", "--quick", "--bench-dir", str(bench), "--out", str(out), "--time-budget", "0"])
    assert rc == 1
    report = json.loads((out / "gpu_report.json").read_text())
    assert {c["status"] for c in report["cases"]} == {"not run"}


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


def test_markdown_rows_come_from_the_report(gpu_report, tmp_path):
    out = tmp_path / "out"
    gpu_report.main(["--device", "cpu", "--quick", "--bench-dir", str(_bench_dir(tmp_path)), "--out", str(out)])
    report = json.loads((out / "gpu_report.json").read_text())
    rows = gpu_report.markdown_rows(report).splitlines()
    assert len(rows) == len(report["cases"]) == 3
    ok = report["cases"][0]
    assert rows[0].startswith("| fake | scale 4096 fp32 | n=4096, dtype=float32 | ")
    assert f"| {ok['ratio']:.2f}x |" in rows[0] and report["card"]["name"] in rows[0]
    assert "| error |" in rows[1] and "not judged" in rows[1]


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


def _finalize_inputs(tmp_path, steps, report=None):
    out = tmp_path / "out"
    out.mkdir()
    (out / "build.log").write_text(PTXAS_LOG)
    (out / "tests_junit.xml").write_text(JUNIT)
    (out / "memcheck.log").write_text(MEMCHECK_LOG)
    (out / "racecheck.log").write_text(RACECHECK_LOG)
    (out / "synccheck.log").write_text(SYNCCHECK_LOG)
    (tmp_path / "steps.tsv").write_text("".join(
        f"{name}\t{status}\t{rc}\t12\t200\t{name}.log\n" for name, status, rc in steps))
    base = {"torch": "2.11.0", "device": "cuda", "card": {"name": "NVIDIA H100 80GB HBM3"},
            "created_utc": "2026-11-27T10:00:00+00:00", "floors": {"device_copy_gbps": 3000.0},
            "import_problems": [], "bench_state": "done",
            "cases": [{"family": "blend", "name": "ste 64M", "status": "ok", "reference_ms": 2.0, "fast_ms": 1.0,
                       "ratio": 2.0, "gbps": 2000.0, "pct_copy": 66.7, "goal": ">= 3x",
                       "goal_verdict": {"met": False, "clauses": []}}]}
    (out / "gpu_report.json").write_text(json.dumps(report or base))
    return out


def _finalize(gpu_report, out, tmp_path):
    return gpu_report.finalize(str(out), str(tmp_path / "steps.tsv"), str(out / "build.log"),
                               str(out / "tests_junit.xml"), str(out / "tests.log"), str(out / "memcheck.log"),
                               str(out / "racecheck.log"), str(out / "synccheck.log"))


def test_finalize_merges_step_results(gpu_report, tmp_path):
    steps = [("build", "ok", 0), ("memcheck", "failed", 1), ("racecheck", "failed", 3), ("synccheck", "ok", 0),
             ("tests", "failed", 1), ("bench", "ok", 0)]
    out = _finalize_inputs(tmp_path, steps)
    report, ok = _finalize(gpu_report, out, tmp_path)
    assert ok is False and report["ok"] is False
    assert json.loads((out / "gpu_report.json").read_text())["ok"] is False

    build = report["build"]
    assert build["ok"] and build["nvcc"].startswith("13.0") and build["warnings"] == 1
    assert [(k["kernel"], k["registers"], k["spill_stores"], k["smem_bytes"]) for k in build["kernels"]] == [
        ("_Z4axpyPfPKffl", 10, 0, 0), ("_Z2tkIdEvPT_", 255, 8, 4096)]
    assert build["spilling_kernels"] == 1

    tests = report["tests"]
    assert (tests["passed"], tests["failed"], tests["errors"], tests["skipped"]) == (2, 1, 0, 1)
    assert tests["failures"] == [{"test": "tests.test_metrics::test_c[cuda]", "kind": "failure",
                                  "message": "AssertionError: 3 != 4"}]
    assert tests["ok"] is False

    memcheck = report["memcheck"]
    assert memcheck["sanitizer"] and memcheck["errors"] == 0
    assert memcheck["failed_checks"] == ["snapshot_capture_restore"] and memcheck["ok"] is False
    racecheck, synccheck = report["racecheck"], report["synccheck"]
    assert racecheck["errors"] == 1 and not racecheck["failed_checks"] and racecheck["ok"] is False
    assert synccheck["errors"] == 0 and list(synccheck["checks"]) == ["blend_scalar_alpha"] and synccheck["ok"] is True
    assert report["bench"]["ok"] is True

    table = gpu_report.format_table(report)
    assert table.splitlines()[-1] == "RESULT: FAIL"
    assert "tests.test_metrics::test_c[cuda]" in table and "ste 64M" in table
    assert "racecheck failed (12 s): 1 errors, 2/2 checks" in table and "synccheck ok (12 s)" in table


def test_finalize_passes_only_when_every_step_passes(gpu_report, tmp_path):
    steps = [("build", "ok", 0), ("memcheck", "ok", 0), ("racecheck", "ok", 0), ("synccheck", "ok", 0),
             ("tests", "ok", 0), ("bench", "ok", 0)]
    out = _finalize_inputs(tmp_path, steps)
    (out / "memcheck.log").write_text(MEMCHECK_LOG.replace(
        "FAILED TypeError: HostSnapshot has none of ('capture',)", "ok"))
    (out / "racecheck.log").write_text(RACECHECK_LOG.replace("1 hazard displayed (1 error", "0 hazards displayed (0 errors"))
    (out / "tests_junit.xml").write_text(JUNIT.replace(
        '<failure message="AssertionError: 3 != 4">trace</failure>', ""))
    report, ok = _finalize(gpu_report, out, tmp_path)
    assert ok is True, {k: report[k]["ok"] for k in ("build", "tests", "memcheck", "racecheck", "synccheck", "bench")}
    assert gpu_report.format_table(report).splitlines()[-1] == "RESULT: PASS"
    # A sanitizer step that did not run fails the check.
    steps_file = tmp_path / "steps.tsv"
    steps_file.write_text("".join(line for line in steps_file.read_text().splitlines(keepends=True)
                                  if not line.startswith("synccheck")))
    report, ok = _finalize(gpu_report, out, tmp_path)
    assert ok is False and report["synccheck"]["ok"] is False


def test_finalize_marks_a_case_cut_off_by_a_crash(gpu_report, tmp_path):
    steps = [("build", "ok", 0), ("memcheck", "ok", 0), ("racecheck", "ok", 0), ("synccheck", "ok", 0),
             ("tests", "ok", 0), ("bench", "timeout", 124)]
    report = {"torch": "2.11.0", "device": "cuda", "cases": [{"family": "snapshot", "name": "1B", "status": "running"}],
              "bench_state": "running 1B"}
    out = _finalize_inputs(tmp_path, steps, report)
    merged, ok = _finalize(gpu_report, out, tmp_path)
    assert not ok and merged["cases"][0]["status"] == "error" and "during this case" in merged["cases"][0]["error"]
    assert merged["bench"]["error_cases"] == ["1B"] and merged["steps"]["bench"]["status"] == "timeout"


def test_tests_summary_falls_back_to_the_log(gpu_report, tmp_path):
    log = tmp_path / "tests.log"
    log.write_text("FAILED tests/test_x.py::test_y[cuda] - boom\n== 1 failed, 7 passed, 2 skipped in 3.21s ==\n")
    summary = gpu_report.summarize_tests(str(tmp_path / "missing.xml"), str(log))
    assert (summary["source"], summary["passed"], summary["failed"], summary["skipped"]) == ("log", 7, 1, 2)
    assert summary["failures"][0]["test"] == "tests/test_x.py::test_y[cuda]"


def test_gpu_check_script_parses():
    done = subprocess.run(["bash", "-n", os.path.join(BENCHMARKS, "gpu_check.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


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
