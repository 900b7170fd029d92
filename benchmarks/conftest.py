"""Prints fast-vs-reference ratios per benchmark group after a pytest-benchmark run."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups = {}
    for bench in session.benchmarks:
        impl = bench.extra_info.get("impl")
        if impl in ("reference", "fast", "floor") and bench.stats is not None:
            groups.setdefault(bench.group, {})[impl] = bench
    rows = []
    for group, pair in sorted(groups.items()):
        if not {"reference", "fast"} <= set(pair):
            continue
        ref, fast = pair["reference"].stats.median, pair["fast"].stats.median
        moved = pair["fast"].extra_info.get("bytes_moved")
        gbps = f"{moved / fast / 1e9:8.2f}" if moved else "       -"
        # floor: the least time measured for the same work; "of floor" = floor / fast.
        floor = pair["floor"].stats.median if "floor" in pair else None
        floor_cols = f"{floor * 1e3:10.3f} {100 * floor / fast:6.0f}%" if floor else f"{'-':>10} {'-':>7}"
        rows.append(f"{group:<58} {ref * 1e3:10.3f} {fast * 1e3:10.3f} {ref / fast:7.2f}x {gbps} {floor_cols}")
    if rows:
        tr = terminalreporter
        tr.write_sep("=", "esper_fast vs reference (median)")
        tr.write_line(
            f"{'case [device]':<58} {'ref ms':>10} {'fast ms':>10} {'ratio':>8} {'GB/s':>8} {'floor ms':>10} {'of floor':>7}"
        )
        for row in rows:
            tr.write_line(row)
