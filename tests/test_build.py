"""The compiled extension is the one in use: no silent fallback to Python."""

import ast
import os
import re
import shutil
import subprocess

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import esper_fast

DECLARED_OPS = sorted(
    name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("esper_fast::")
)
# The families API.md promises; each must be declared by the extension.
REQUIRED_OPS = {"blend_forward", "blend_backward", "ste_forward"}


def test_extension_is_loaded_from_this_package():
    path = esper_fast.extension_path()
    assert os.path.basename(path).startswith("_C")
    assert os.path.dirname(os.path.realpath(path)) == os.path.dirname(os.path.realpath(esper_fast.__file__))


def test_required_ops_are_declared():
    assert REQUIRED_OPS <= set(DECLARED_OPS)


@pytest.mark.parametrize("op", DECLARED_OPS)
def test_every_op_has_a_cpu_kernel(op):
    assert op in esper_fast.kernels_available()["cpu"]


@pytest.mark.skipif(os.environ.get("ESPER_FAST_REQUIRE_CUDA_BUILD") != "1", reason="CUDA build not required here")
@pytest.mark.parametrize("op", DECLARED_OPS)
def test_ci_build_carries_cuda_kernels(op):
    assert esper_fast._C.cuda_compiled == 1
    assert op in esper_fast.kernels_available()["cuda"]


def test_kernels_available_reports_backends():
    available = esper_fast.kernels_available()
    assert set(available) == {"cpu", "cuda"}
    assert available["cpu"] == DECLARED_OPS
    if esper_fast._C.cuda_compiled:
        assert available["cuda"] == DECLARED_OPS
    else:
        assert available["cuda"] == []


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


def test_public_wrappers_dispatch_to_the_extension():
    host = torch.randn(2, 3, 4, 4, requires_grad=True)
    seed = torch.randn(2, 3, 4, 4, requires_grad=True)
    with _RecordOps() as recorded:
        (esper_fast.ops.blend(host, seed, 0.3, detach_host=False).sum() + esper_fast.ops.ste(host, seed).sum()).backward()
    assert {"esper_fast::blend_forward", "esper_fast::blend_backward", "esper_fast::ste_forward"} <= recorded.names


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_list(name):
    """The literal list assigned to `name` in setup.py, read without running setup()."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py assigns no {name}")


# Float32 arithmetic that --use_fast_math (or -ftz=true) turns into its .ftz form.
_FTZ = re.compile(r"\b(?:add|sub|mul|fma|div|max|min|setp|ex2|rcp|sqrt)\.[\w.]*ftz[\w.]*f32")

_PROBE = r"""
__global__ void probe(float* out, const float* a, const float* b, const float* c, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = a[i] * b[i] + c[i] + __expf(a[i]) + (a[i] > b[i] ? a[i] : b[i]) + a[i] / b[i];
}
"""


def test_nvcc_flags_keep_denormals(tmp_path):
    # The extension's nvcc flags must not flush float32 denormals to zero.
    flags = _setup_list("nvcc_flags")
    assert not {"--use_fast_math", "-use_fast_math", "-ftz=true", "--ftz=true"} & set(flags), flags
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found: the flags were checked, not the PTX they produce")
    source = tmp_path / "probe.cu"
    source.write_text(_PROBE)
    ptx = tmp_path / "probe.ptx"
    done = subprocess.run([nvcc, "-ptx", "-arch=sm_90", *flags, str(source), "-o", str(ptx)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    text = ptx.read_text()
    assert re.search(r"\bfma\.rn\.f32", text), "the probe kernel compiled to no float32 math"
    assert not _FTZ.findall(text), _FTZ.findall(text)[:5]


@pytest.mark.cuda
def test_built_kernels_keep_denormals():
    # The machine code of the built extension: no float32 instruction with .FTZ.
    if not esper_fast._C.cuda_compiled:
        pytest.skip("a CPU-only build")
    cuobjdump = shutil.which("cuobjdump") or next(
        (p for p in ("/usr/local/cuda/bin/cuobjdump",) if os.path.exists(p)), None)
    if cuobjdump is None:
        pytest.skip("cuobjdump not found")
    done = subprocess.run([cuobjdump, "-sass", esper_fast.extension_path()], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Function :" in done.stdout, "no device code found in the extension"
    # Float32 opcodes (FADD.FTZ, FFMA.FTZ, FSETP.GT.FTZ, F2F..., MUFU.EX2...); the double
    # division's reciprocal seed (MUFU.RCP64H) is not a float32 op.
    flushed = {m.group(0) for m in re.finditer(r"\b(?:F[A-Z0-9]*|MUFU)(?:\.[A-Z0-9_]+)*?\.FTZ\b[\w.]*", done.stdout)}
    flushed = sorted(op for op in flushed if "64" not in op)
    assert not flushed, flushed[:10]


# ---- facts the kernels and Python share: defined once in C++ (csrc/metrics.h, csrc/snapshot.h),
# exported by _C, read from there.

METRICS_SLOTS = ["loss_sum", "batches", "correct", "total", "errors", "bad_value", "blocks_done"]


def test_metrics_state_layout_is_exported_and_compact():
    slots = {name: getattr(esper_fast._C, f"metrics_slot_{name}") for name in METRICS_SLOTS}
    assert sorted(slots.values()) == list(range(len(slots)))  # no unused slot
    assert esper_fast._C.metrics_header == len(slots)
    # What the Python side relies on: the summed counts are consecutive, the ticket follows every
    # slot a reduction over ranks carries.
    counts = [slots[name] for name in ("batches", "correct", "total", "errors")]
    assert counts == list(range(counts[0], counts[0] + 4))
    assert slots["blocks_done"] == len(slots) - 1


def test_python_reads_the_exported_facts():
    from esper_fast.ops import MetricsAccumulator, metrics, snapshot

    for name in METRICS_SLOTS:
        assert getattr(metrics, f"_{name.upper()}") == getattr(esper_fast._C, f"metrics_slot_{name}"), name
    assert metrics._HEADER == esper_fast._C.metrics_header
    assert MetricsAccumulator(5, "cpu").state.numel() == esper_fast._C.metrics_header
    assert MetricsAccumulator(5, "cpu", per_class=True).state.numel() == esper_fast._C.metrics_header + 10
    assert MetricsAccumulator.PACKED_HEADER == esper_fast._C.metrics_slot_blocks_done
    assert snapshot._STAGED_COPY_BYTES == esper_fast._C.snapshot_staged_copy_bytes
    # Bound from _C in the source, not literals that happen to agree today.
    names = {f"_{name.upper()}" for name in METRICS_SLOTS} | {"_HEADER", "_STAGED_COPY_BYTES"}
    for module in (metrics, snapshot):
        with open(module.__file__) as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) in names for t in node.targets):
                value = node.value
                assert isinstance(value, ast.Attribute) and getattr(value.value, "id", None) == "_C", ast.unparse(node)


def _python_sources():
    for top in ("esper_fast", "tests", "benchmarks", "tools"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    with open(path) as f:
                        yield os.path.relpath(path, ROOT), f.read()


def test_no_file_hard_codes_the_shared_facts():
    # C++: each fact is defined once.
    definitions = {r"\bkStagedCopyBytes\s*=(?!=)": "csrc/snapshot.h", r"\bkLossSum\s*=(?!=)": "csrc/metrics.h",
                   r"\bkHeader\s*=(?!=)": "csrc/metrics.h"}
    for pattern, home in definitions.items():
        found = []
        for folder, _, files in os.walk(os.path.join(ROOT, "csrc")):
            for name in files:
                path = os.path.join(folder, name)
                with open(path) as f:
                    found += [os.path.relpath(path, ROOT)] * len(re.findall(pattern, f.read()))
        assert found == [home], (pattern, found)
    # Python: no metrics state (or packed state) is indexed by a number, and no code that copies
    # snapshots spells the staging threshold.
    threshold = re.compile(r"\b1\s*<<\s*20\b|\b2\s*\*\*\s*20\b|\b1_?048_?576\b|\b1\s*MiB\b")
    for path, text in _python_sources():
        if "MetricsAccumulator" in text or "metrics_update" in text:
            for node in ast.walk(ast.parse(text)):
                if not isinstance(node, ast.Subscript):
                    continue
                target = node.value
                name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
                index = node.slice
                bounds = [index.lower, index.upper] if isinstance(index, ast.Slice) else [index]
                literal = any(isinstance(b, ast.Constant) and isinstance(b.value, int) for b in bounds)
                assert not (name in ("state", "packed") and literal), f"{path}:{node.lineno}: {ast.unparse(node)}"
        if "HostSnapshot" in text or "snapshot_pack" in text:
            assert not threshold.search(text), f"{path}: {threshold.search(text).group(0)!r}"
