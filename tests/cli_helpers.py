"""Helpers shared by the tests of ``esper-fast train``: calling the CLI in-process, its
one-line errors, and reading a run's log."""

import json

import pytest

from esper_fast import train
from esper_fast.train import cli

# Wall-clock fields, and the paths of the run's files: the only ones in which two runs of the
# same settings (in different folders, or one resumed) may differ.
CLOCK = {"started_at", "ended_at", "train_time_s", "eval_time_s", "epoch_time_s", "samples_per_s",
         "time", "total_time_s", "mean_epoch_time_s", "metrics", "plot"}


def run_cli(capsys, *argv):
    """``esper-fast ARGV`` in this process: (exit code, stdout, stderr)."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def in_process(workdir, argv, signal_at=None):
    """``esper-fast ARGV`` in this process, in ``workdir``, with the default kernels and, with
    ``signal_at`` (``SIGTERM@EPOCH:STEP``), a signal it sends itself there; the exit code."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        patch.delenv("ESPER_FAST_REFERENCE", raising=False)
        if signal_at:
            patch.setenv("ESPER_FAST_SELF_SIGNAL", signal_at)
        else:
            patch.delenv("ESPER_FAST_SELF_SIGNAL", raising=False)
        return cli.main([str(a) for a in argv])


def one_line_error(code, err, fragment):
    """The CLI failed as a user mistake: exit 2 and one ``esper-fast: error:`` line."""
    lines = err.strip().splitlines()
    assert code == cli.EXIT_USAGE and len(lines) == 1, err
    assert lines[0].startswith("esper-fast: error: ") and fragment in lines[0], lines[0]


def read_log(path):
    """Every record of a metrics.jsonl (raises on a torn or interleaved line)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def outcome(out):
    """Every epoch record and the summary of the run in ``out``, without the wall-clock fields."""
    records = [r for r in read_log(out / train.METRICS_FILE) if r["type"] in ("epoch", "summary")]
    return [{k: v for k, v in r.items() if k not in CLOCK} for r in records]
