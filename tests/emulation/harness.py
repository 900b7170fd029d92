"""Builds and runs the emulated launches of tests/emulation/<family>_emulated.cpp.

Each family's program is the kernel header csrc/cuda/<family>_kernels.cuh compiled with g++
after cuda_emulation.h, in three variants: plain, ThreadSanitizer, and AddressSanitizer with
UndefinedBehaviorSanitizer. Programs are cached under build/emulation/ by a digest of every
source they include, the flags and the compiler, so an unchanged tree rebuilds nothing (and a
changed one replaces the family's program).
A mutated kernel header (tests/test_emulation_mutations.py) is a copy of csrc/ with one file
patched, built the same way into its own cache entry.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch.utils.cpp_extension

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
BUILD = ROOT / "build" / "emulation"
FAMILIES = ("metrics", "blend", "snapshot")  # and "runtime": the emulation's own rules

# -O2 everywhere: g++ forms FMAs only from -O2 (see isa_flags).
VARIANTS = {
    "plain": ["-O2"],
    # -Wno-tsan: the race detector does not model fences (__threadfence); blocks run one at a
    # time here, so no fence is what orders two blocks' memory.
    "tsan": ["-O2", "-g", "-fsanitize=thread", "-Wno-tsan"],
    "asan": ["-O2", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
}

SANITIZER_ENV = {
    "TSAN_OPTIONS": "halt_on_error=1 exitcode=66 report_signal_unsafe=0",
    "ASAN_OPTIONS": "detect_leaks=0 abort_on_error=0 exitcode=67",
    "UBSAN_OPTIONS": "print_stacktrace=1 halt_on_error=1 exitcode=68",
}

# x86-64-v3's features: where the CPU has them all, the CPU blend kernels run their
# target_clones("arch=x86-64-v3") loops, which contract a * b + c into an FMA, as nvcc does by
# default. The emulation is built for the same ISA so its float math rounds as theirs does.
_V3_FLAGS = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def available() -> str | None:
    """Why the emulation cannot run here, or None. With ESPER_FAST_REQUIRE_EMULATION=1 (CI) a
    reason is an error, not a skip."""
    reason = None
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        reason = "the emulation runs on x86-64 Linux"
    elif compiler() is None:
        reason = "no C++ compiler (g++)"
    if reason and os.environ.get("ESPER_FAST_REQUIRE_EMULATION") == "1":
        raise RuntimeError(f"ESPER_FAST_REQUIRE_EMULATION=1 but {reason}")
    return reason


def isa_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return ["-march=x86-64-v3"] if _V3_FLAGS <= set(flags) else []


def _flags(variant: str, csrc: Path) -> list[str]:
    torch_include = torch.utils.cpp_extension.include_paths()[0]  # c10/util/Half.h, BFloat16.h
    return (["-std=c++17", "-pthread", "-Wall", "-Wno-unused-function"] + VARIANTS[variant] + isa_flags()
            + [f"-I{csrc}", f"-I{HERE}", f"-isystem{torch_include}"])


def _digest(family: str, variant: str, csrc: Path) -> str:
    h = hashlib.sha256()
    version = subprocess.run([compiler(), "--version"], capture_output=True, text=True).stdout
    h.update("\0".join(_flags(variant, csrc)).replace(str(csrc), "<csrc>").encode() + version.encode())
    sources = sorted(HERE.glob("*.h")) + [HERE / f"{family}_emulated.cpp"]
    sources += sorted(csrc.glob("*.h")) + sorted((csrc / "cuda").glob("*.cuh"))
    for path in sources:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def build(family: str, variant: str = "plain", csrc: Path = CSRC) -> Path:
    """The program for `family` and `variant` compiled against the kernel headers in `csrc`."""
    folder = BUILD if csrc == CSRC else csrc.parent  # a mutant's programs beside its sources
    exe = folder / f"{family}-{variant}-{_digest(family, variant, csrc)}"
    if exe.exists():
        return exe
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f"{family}-{variant}-*"):
        stale.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        out = Path(tmp) / exe.name
        cmd = [compiler(), *_flags(variant, csrc), str(HERE / f"{family}_emulated.cpp"), "-o", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building the {variant} {family} emulation failed:\n{' '.join(cmd)}\n{done.stderr[-6000:]}")
        os.replace(out, exe)  # atomic: a concurrent build of the same digest gives the same file
    return exe


def build_all(pairs, csrc: Path = CSRC) -> dict:
    """{(family, variant): program} for every pair, two compilers at a time."""
    pairs = list(pairs)
    with ThreadPoolExecutor(max_workers=2) as pool:
        programs = list(pool.map(lambda fv: build(*fv, csrc=csrc), pairs))
    return dict(zip(pairs, programs))


class EmulationFailed(AssertionError):
    pass


def run(program: Path, args, stdin: bytes, timeout: float = 900) -> bytes:
    """stdout of one emulated run; EmulationFailed with stderr's tail when it exits non-zero (a
    sanitizer report, an emulation abort such as a divergent shuffle, or a crash)."""
    env = dict(os.environ, **SANITIZER_ENV)
    done = subprocess.run([str(program), *map(str, args)], input=stdin, capture_output=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise EmulationFailed(f"{program.name} {' '.join(map(str, args))} exited with {done.returncode}:\n"
                              f"{done.stderr.decode(errors='replace')[-4000:]}")
    return done.stdout
