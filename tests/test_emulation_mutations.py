"""The emulated checks can fail: each of seven bugs, injected into a copy of the kernel header
(csrc/cuda/<family>_kernels.cuh), makes a check of tests/test_emulation.py fail in the build
that is meant to see it.

- plain build: a missing ticket reset (the second update never finishes: its counts are
  missing), a shuffle in a divergent branch (the emulation aborts: lanes of one warp reach
  different shuffles);
- AddressSanitizer: the long-row tail loop off by one (a read past the logits);
- ThreadSanitizer: a missing barrier before warp 0 reads the warps' partials, a missing
  end-of-row barrier (the next row's partials overwrite the slots warp 0 still reads), a missing
  trailing barrier in blend's block reduction (the next tile's partials overwrite them);
- not seen: a removed __threadfence. The emulation runs one block at a time, and the pool that
  runs them orders every block's writes before the next block starts, so the last block always
  sees the other blocks' partials. Only concurrent blocks on a GPU can show it (xfail, strict: a
  change that makes the emulation see it fails here and must update this list).

metrics' block_partial has a trailing barrier too; removing it is not a bug today: every caller
reaches another barrier before `shared` is written again, so no mutation of it is listed.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "emulation"))
import harness  # noqa: E402
from test_emulation import BLEND_ONE_BLOCK, FEW, ONE_BLOCK, PLANS, _run_blend, _run_metrics  # noqa: E402

pytestmark = [pytest.mark.emulated, pytest.mark.skipif(harness.available() is not None,
                                                      reason=str(harness.available()))]

METRICS = "cuda/metrics_kernels.cuh"
BLEND = "cuda/blend_kernels.cuh"


def _metrics_short(program):
    _run_metrics(program, "float32", 10, 300, device=FEW)


def _metrics_long(program):
    _run_metrics(program, "float32", 1031, 5, device=ONE_BLOCK, kind="ties")


def _blend_tiles(program):
    groups, per_group = PLANS["group_tiles_several"]
    _run_blend(program, "float32", groups, per_group, "per_sample", device=BLEND_ONE_BLOCK)


# name: (header, text, replacement, build that sees it, check)
MUTATIONS = {
    "missing_ticket_reset": (METRICS, "  state[kBlocksDone] = 0;\n", "", "plain", _metrics_short),
    "shuffle_in_divergent_branch": (
        METRICS, "    other.loss = __shfl_down_sync(0xffffffffu, part.loss, offset);\n",
        "    other.loss = lane_below_16() ? __shfl_down_sync(0xffffffffu, part.loss, offset) : 0.0;\n",
        "plain", _metrics_short),
    "long_row_tail_off_by_one": (METRICS, "    if (i < width) st.push_one", "    if (i <= width) st.push_one", "asan",
                                 _metrics_long),
    "missing_barrier_before_warp0_reads": (
        METRICS, "      shared_index[warp] = st.best_index;\n    }\n    __syncthreads();\n",
        "      shared_index[warp] = st.best_index;\n    }\n", "tsan", _metrics_long),
    "missing_end_of_row_barrier": (METRICS, "    __syncthreads();  // the shared slots are reused by the next row\n", "",
                                   "tsan", _metrics_long),
    "missing_trailing_barrier_in_block_sum": (
        BLEND, "  }\n  __syncthreads();\n  return value;\n", "  }\n  return value;\n", "tsan", _blend_tiles),
    "removed_threadfence": (METRICS, "    __threadfence();  // the partial is visible before the ticket is\n", "",
                            "tsan", _metrics_short),
}
NOT_SEEN = {"removed_threadfence": "blocks run one at a time in the emulation: cross-block memory ordering "
                                   "(what __threadfence provides) cannot go wrong there; only a GPU shows it"}
# How each is seen.
EXPECTED = {
    "missing_ticket_reset": "counts, flags, ticket and per-class counts",
    "shuffle_in_divergent_branch": "lanes of one warp in different shuffles",
    "long_row_tail_off_by_one": "AddressSanitizer: heap-buffer-overflow",
    "missing_barrier_before_warp0_reads": "ThreadSanitizer: data race",
    "missing_end_of_row_barrier": "ThreadSanitizer: data race",
    "missing_trailing_barrier_in_block_sum": "ThreadSanitizer: data race",
    "removed_threadfence": "ThreadSanitizer: data race",
}
# The divergent branch needs a lane test the header does not have.
HELPERS = {"shuffle_in_divergent_branch": "__device__ inline bool lane_below_16() { return threadIdx.x % 32 < 16; }\n"}


def _mutant(name: str):
    header, text, replacement, variant, _ = MUTATIONS[name]
    csrc = harness.BUILD / "mutants" / name / "csrc"
    if csrc.exists():
        shutil.rmtree(csrc)
    shutil.copytree(harness.CSRC, csrc)
    path = csrc / header
    source = path.read_text()
    assert source.count(text) == 1, f"{name}: the text to mutate is not once in {header}; update the mutation"
    if name in HELPERS:
        anchor = "// A block's partial in the launch's workspace"
        assert source.count(anchor) == 1
        source = source.replace(anchor, HELPERS[name] + "\n" + anchor)
    path.write_text(source.replace(text, replacement))
    return harness.build(header.split("/")[1].split("_")[0], variant, csrc=csrc)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(reason=NOT_SEEN[n], strict=True))
                                  if n in NOT_SEEN else n for n in MUTATIONS])
def test_injected_bug_fails_the_emulated_check(name):
    program = _mutant(name)
    with pytest.raises((harness.EmulationFailed, AssertionError)) as failure:
        MUTATIONS[name][4](program)
    assert EXPECTED[name] in str(failure.value), str(failure.value)[-3000:]


def test_the_unmutated_checks_pass():
    """The same checks pass on the kernels as they are (what makes the failures above mean a bug)."""
    for variant in ("plain", "asan", "tsan"):
        _metrics_short(harness.build("metrics", variant))
        _metrics_long(harness.build("metrics", variant))
        _blend_tiles(harness.build("blend", variant))
