"""The benchmark protocol shared by pytest-benchmark (``bench_*.py``) and the GPU report.

Each ``bench_<family>.py`` exposes ``CASES``: a list of :class:`Case`. A case builds its
inputs once per device and offers a reference and a fast callable over them, plus the
minimal number of bytes the operation must move (for achieved GB/s against the measured
device-copy bandwidth). pytest-benchmark times both in the same run; ``gpu_report.py``
times them with CUDA events.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import torch

_DEVICE_WORDS = {"cpu": ("cpu",), "cuda": ("cuda", "gpu")}


def goal_clauses(goal: str, device: str | None = None) -> list[str]:
    """The clauses of a goal such as ``"cpu >= 2x, cuda >= 5x and >= 80% of copy"`` (split on
    ``;``, ``,`` and ``and``) that apply on ``device``: a clause naming another device is left
    out; a clause naming none applies everywhere."""
    clauses = [c.strip() for c in re.split(r";|,|\band\b", (goal or "").replace("\u2265", ">="))]
    if device is None:
        return [c for c in clauses if c]
    kind = "cuda" if device.startswith("cuda") else "cpu"
    others = [w for k, words in _DEVICE_WORDS.items() if k != kind for w in words]
    return [c for c in clauses if c and not any(re.search(rf"\b{w}\b", c.lower()) for w in others)]


@dataclasses.dataclass
class Case:
    family: str                              # "blend", "metrics", "snapshot", "e2e"
    name: str                                # unique, human readable: "ste fwd+bwd 32x256x384 fp32"
    setup: Callable[[str], Any]              # device -> state handed to reference/fast
    reference: Callable[[Any], Any]          # the original algorithm
    fast: Callable[[Any], Any]               # the esper_fast path
    bytes_moved: Callable[[Any], int] | None = None  # least bytes the op must read + write
    devices: tuple = ("cpu", "cuda")
    goal: str = ""                           # the goal for this case, e.g. ">= 3x"
    params: dict = dataclasses.field(default_factory=dict)  # sizes, dtype... for the report
    floor: Callable[[Any], Any] | None = None  # the work no implementation can skip, timed alike
    large: bool = False                      # needs many GB: left out of the one-shot GPU check unless asked for

    @property
    def gpu_goal(self) -> bool:
        """Whether the goal says something about CUDA: such cases are timed first in the GPU check."""
        return bool(goal_clauses(self.goal, "cuda"))

    def id(self) -> str:
        return self.name.replace(" ", "_")


def synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[Any], Any], state: Any, device: str) -> Callable[[], None]:
    """A zero-argument callable for pytest-benchmark that includes the device's completion."""

    def run():
        fn(state)
        synchronize(device)

    return run


def devices_for(case: Case) -> list[str]:
    available = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [d for d in case.devices if d in available]


def bench_params(cases: list[Case]):
    """pytest parametrisation over (case, device, impl) with readable ids."""
    import pytest

    params = []
    for case in cases:
        for device in case.devices:
            marks = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")] if device == "cuda" else []
            for impl in ("reference", "fast") + (("floor",) if case.floor is not None else ()):
                params.append(pytest.param(case, device, impl, id=f"{case.id()}-{device}-{impl}", marks=marks))
    return params


def run_case(benchmark, case: Case, device: str, impl: str, rounds: int | None = None) -> None:
    """Time one side of a case under pytest-benchmark, grouped so the ratio can be reported."""
    state = case.setup(device)
    fn = {"reference": case.reference, "fast": case.fast, "floor": case.floor}[impl]
    benchmark.group = f"{case.name} [{device}]"
    benchmark.extra_info.update({"impl": impl, "device": device, "family": case.family, **case.params})
    if case.bytes_moved is not None:
        benchmark.extra_info["bytes_moved"] = int(case.bytes_moved(state))
    run = timed(fn, state, device)
    run()  # warm-up: first-call costs (allocation, lazy init) are not what is measured
    if rounds is None:
        benchmark(run)
    else:
        benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
