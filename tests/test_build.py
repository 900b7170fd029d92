"""The compiled extension is the one in use: no silent fallback to Python."""

import ast
import importlib.util
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

_REQUIRED = os.environ.get("ESPER_FAST_REQUIRE_CUDA_BUILD") == "1"


def _tool(name: str) -> str:
    """A CUDA binary tool: on PATH, in the toolkit, or the copy triton ships inside torch's
    environment. Missing: a skip, or a failure where the CUDA build is required (CI)."""
    triton = importlib.util.find_spec("triton")
    candidates = [shutil.which(name)]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", name))
    if triton is not None and triton.submodule_search_locations:
        candidates.append(os.path.join(list(triton.submodule_search_locations)[0], "backends", "nvidia", "bin", name))
    found = next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)
    if found is None:
        message = f"{name} not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin, triton's bin)"
        if _REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    return found


def _built_cuda_extension() -> str:
    if not esper_fast._C.cuda_compiled:
        if _REQUIRED:
            pytest.fail("the CUDA build is required but the extension has no CUDA kernels")
        pytest.skip("a CPU-only build")
    return esper_fast.extension_path()


@pytest.mark.toolchain
def test_nvcc_flags_keep_denormals(tmp_path):
    # The extension's nvcc flags must not flush float32 denormals to zero.
    flags = _setup_list("nvcc_flags")
    assert not {"--use_fast_math", "-use_fast_math", "-ftz=true", "--ftz=true"} & set(flags), flags
    nvcc = _tool("nvcc")
    source = tmp_path / "probe.cu"
    source.write_text(_PROBE)
    ptx = tmp_path / "probe.ptx"
    done = subprocess.run([nvcc, "-ptx", "-arch=sm_90", *flags, str(source), "-o", str(ptx)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    text = ptx.read_text()
    assert re.search(r"\bfma\.rn\.f32", text), "the probe kernel compiled to no float32 math"
    assert not _FTZ.findall(text), _FTZ.findall(text)[:5]


# A SASS instruction: its address comment, an optional predicate, then the opcode with its modifiers.
_SASS_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")
# Float32 arithmetic, comparison, conversion between float types and the special-function unit:
# their .FTZ form flushes float denormals. F2I.FTZ...TRUNC (every integer division emits one)
# converts to an integer, where a denormal becomes 0 either way.
_FLOAT_OPCODES = ("FADD", "FMUL", "FFMA", "FMNMX", "FSET", "FSETP", "FCHK", "FRND", "FSWZADD", "F2F", "MUFU")


def flushing_instructions(sass: str) -> list[str]:
    """The distinct float instructions of ``sass`` that flush denormals to zero."""
    flushed = set()
    for match in _SASS_OPCODE.finditer(sass):
        base, *modifiers = match.group(1).split(".")
        if "FTZ" not in modifiers:
            continue
        # FADD32I, FFMA2...: sized and packed forms of the same operations.
        if not any(base == op or (base.startswith(op) and base[len(op):].rstrip("I").isdigit())
                   for op in _FLOAT_OPCODES):
            continue
        if base == "MUFU" and any(m.endswith("64H") for m in modifiers):
            continue  # the float64 reciprocal's seed, not a float32 result
        flushed.add(match.group(1))
    return sorted(flushed)


def test_flushing_instructions_reads_sass():
    sass = """
        /*0040*/                   FADD.FTZ R1, R2, R3 ;
        /*0050*/               @!P0 FSETP.GT.FTZ.AND P1, PT, R2, R3, PT ;
        /*0060*/                   F2I.FTZ.U32.TRUNC.NTZ R4, R5 ;
        /*0070*/                   MUFU.RCP64H R6, R7 ;
        /*0080*/                   MUFU.EX2.FTZ R8, R9 ;
        /*0090*/                   FFMA R1, R2, R3, R4 ;
        /*00a0*/                   F2F.FTZ.F32.F64 R1, R2 ;
        /*00b0*/                   FMUL32I.FTZ R1, R2, 0.5 ;
        /*00c0*/                   IMAD.WIDE.U32 R2, R3, R4, R5 ;
        /*00d0*/                   UF2I.FTZ.U32.TRUNC.NTZ UR4, UR5 ;
    """
    assert flushing_instructions(sass) == [
        "F2F.FTZ.F32.F64", "FADD.FTZ", "FMUL32I.FTZ", "FSETP.GT.FTZ.AND", "MUFU.EX2.FTZ"]


@pytest.mark.toolchain
def test_built_kernels_keep_denormals():
    # The machine code of the built extension: no float instruction with .FTZ.
    path = _built_cuda_extension()
    done = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Function :" in done.stdout, "no device code found in the extension"
    assert _SASS_OPCODE.search(done.stdout), "cuobjdump printed no instruction this test can read"
    flushed = flushing_instructions(done.stdout)
    assert not flushed, flushed[:10]


_RESOURCES = re.compile(r"Function ([^:\s]+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def kernels_with_local_memory(res_usage: str) -> tuple[int, list[tuple[str, int, int]]]:
    """How many kernels ``cuobjdump -res-usage`` lists, and those with a stack frame or local
    memory: (name, stack bytes, local bytes)."""
    kernels = _RESOURCES.findall(res_usage)
    assert len(kernels) == res_usage.count("Function "), "a kernel's resource line was not read"
    return len(kernels), [(name, int(stack), int(local)) for name, _, stack, _, local in kernels
                          if int(stack) or int(local)]


def test_kernels_with_local_memory_reads_res_usage():
    listing = """
 Function _Z4fastPf:
  REG:32 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:904 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z5spillPf:
  REG:255 STACK:16 SHARED:1024 LOCAL:8 CONSTANT[0]:904 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    assert kernels_with_local_memory(listing) == (2, [("_Z5spillPf", 16, 8)])


@pytest.mark.toolchain
def test_built_kernels_use_no_local_memory():
    # A kernel with a stack frame or local memory spills registers (or indexes a local array):
    # every kernel of the built extension keeps its state in registers and shared memory.
    done = subprocess.run([_tool("cuobjdump"), "-res-usage", _built_cuda_extension()], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    count, spilling = kernels_with_local_memory(done.stdout)
    assert count, "cuobjdump -res-usage listed no kernel"
    assert not spilling, spilling[:5]


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
