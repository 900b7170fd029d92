"""Run folders that are never clobbered: the lock against a second run, finished and
unfinished runs refused without --overwrite or --resume, atomic checkpoints (a process
killed between write and rename leaves the previous one loadable), a run that survives its
folder being deleted and its stdout being closed, and ``esper-fast plot``."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from esper_fast import train
from cli_helpers import one_line_error, run_cli

TINY = ["--max-batches", "2", "--batch-size", "32", "--no-progress"]


def start_child(argv, cwd, **kwargs):
    env = {k: v for k, v in os.environ.items() if k not in ("ESPER_FAST_REFERENCE", "ESPER_FAST_SELF_SIGNAL")}
    return subprocess.Popen([sys.executable, "-m", "esper_fast", *argv], cwd=cwd, env=env, text=True, **kwargs)


def wait_for(predicate, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _checkpoint_from(out, epoch: int) -> bool:
    """A checkpoint of ``epoch`` or later exists (only the last ones are kept, so the one of
    ``epoch`` itself may already be gone)."""
    return any(p.name >= f"epoch-{epoch:04d}.pt" for p in (out / train.CHECKPOINT_DIR).glob("epoch-*.pt"))


def whole_json_lines(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]  # raises on a torn or interleaved line


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./data: the generated image set
    monkeypatch.delenv("ESPER_FAST_REFERENCE", raising=False)
    return tmp_path


def test_a_second_run_into_the_same_folder_is_refused_and_the_first_keeps_its_log(workdir, capsys):
    out = workdir / "busy"
    first = start_child(["train", "--epochs", "40", "--max-batches", "1", "--batch-size", "16", "--no-progress",
                         "--out", str(out)], workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: _checkpoint_from(out, 1), "the first run's first epoch")
        code, stdout, err = run_cli(capsys, "train", "--epochs", "2", *TINY, "--out", out)
        one_line_error(code, err, f"{out} is in use by another run (pid {first.pid}")
        assert stdout == ""
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 143
    finally:
        if first.poll() is None:
            first.kill()
    log = whole_json_lines(out / train.METRICS_FILE)
    assert log[0]["type"] == "config" and log[0]["epochs"] == 40  # the first run's, untouched
    epochs = [r["epoch"] for r in log if r["type"] == "epoch"]
    assert epochs == list(range(1, len(epochs) + 1)) and log[-1]["status"] == "interrupted"


def test_a_finished_run_is_never_overwritten_without_overwrite(workdir, capsys):
    out = workdir / "done"
    assert run_cli(capsys, "train", "--epochs", "1", *TINY, "--out", out)[0] == 0
    before = (out / train.METRICS_FILE).read_bytes()
    code, _, err = run_cli(capsys, "train", "--epochs", "1", *TINY, "--out", out)
    one_line_error(code, err, f"--out {out} already holds a finished run (cifar10, 1 epochs")
    assert "--overwrite" in err and (out / train.METRICS_FILE).read_bytes() == before
    code, _, err = run_cli(capsys, "train", "--resume", out)
    one_line_error(code, err, "there is nothing to resume")

    # --overwrite replaces the run's own files and nothing else.
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "train", "--epochs", "2", *TINY, "--out", out, "--overwrite")
    assert code == 0, err
    log = whole_json_lines(out / train.METRICS_FILE)
    assert log[0]["epochs"] == 2 and [r["type"] for r in log].count("config") == 1
    assert (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in train.RunDir(out).checkpoints()] == ["epoch-0001.pt", "epoch-0002.pt"]


def test_an_unfinished_run_is_refused_with_the_way_to_resume_it(workdir, capsys, monkeypatch):
    out = workdir / "stopped"
    monkeypatch.setenv("ESPER_FAST_SELF_SIGNAL", "SIGTERM@2:1")
    code, _, err = run_cli(capsys, "train", "--epochs", "3", *TINY, "--out", out)
    assert code == 143 and "continue with: esper-fast train --resume" in err
    monkeypatch.delenv("ESPER_FAST_SELF_SIGNAL")
    code, _, err = run_cli(capsys, "train", "--epochs", "3", *TINY, "--out", out)
    one_line_error(code, err, "holds an unfinished run (stopped after epoch 1 of 3 by SIGTERM)")
    assert f"esper-fast train --resume {out}" in err


def test_the_log_of_an_older_run_without_status_is_not_clobbered(workdir, capsys):
    out = workdir / "old"
    out.mkdir()
    (out / train.METRICS_FILE).write_text('{"type": "config"}\n')
    code, _, err = run_cli(capsys, "train", "--epochs", "1", *TINY, "--out", out)
    one_line_error(code, err, "holds the log of an earlier run")


def test_a_checkpoint_is_atomic_a_kill_before_the_rename_leaves_the_previous_one(tmp_path):
    run_dir = train.RunDir(tmp_path / "run", warn=lambda line: None)
    run_dir.acquire()
    first = {"epoch": 1, "weights": torch.arange(6.0)}
    run_dir.save_checkpoint(first, 1)
    pid = os.fork()
    if pid == 0:  # the child dies between writing the new file and renaming it into place
        os.replace = lambda *args: os._exit(9)
        run_dir.save_checkpoint({"epoch": 2, "weights": torch.zeros(6)}, 2)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 9
    folder = tmp_path / "run" / train.CHECKPOINT_DIR
    assert sorted(p.name for p in folder.iterdir()) == [f".epoch-0002.pt.{pid}.tmp", "epoch-0001.pt"]
    payload, path = run_dir.load_checkpoint()
    assert path.name == "epoch-0001.pt" and torch.equal(payload["weights"], first["weights"])
    run_dir.remove_stale_temporaries()
    assert [p.name for p in folder.iterdir()] == ["epoch-0001.pt"]
    # The newest `keep` are kept; a damaged newest one falls back to the one before.
    for epoch in (2, 3):
        run_dir.save_checkpoint({"epoch": epoch}, epoch)
    assert [p.name for p in run_dir.checkpoints()] == ["epoch-0002.pt", "epoch-0003.pt"]
    (folder / "epoch-0003.pt").write_bytes(b"damaged")
    warnings = []
    run_dir.warn = warnings.append
    assert run_dir.load_checkpoint()[0] == {"epoch": 2} and "cannot be read" in warnings[0]
    run_dir.release()


def test_the_folder_is_made_again_when_deleted_a_failed_checkpoint_stops_and_a_failed_plot_does_not(tmp_path):
    warnings = []
    run_dir = train.RunDir(tmp_path / "run", warn=warnings.append)
    run_dir.acquire("test")
    run_dir.start_log([{"type": "config"}])
    shutil.rmtree(tmp_path / "run")
    run_dir.append({"type": "epoch", "epoch": 1})
    assert whole_json_lines(tmp_path / "run" / train.METRICS_FILE) == [{"type": "config"}, {"type": "epoch", "epoch": 1}]
    assert len(warnings) == 1 and "disappeared during the run" in warnings[0]
    # The lock was taken again: a second run cannot slip in.
    with pytest.raises(train.RunDirError, match="in use by another run"):
        train.RunDir(tmp_path / "run").acquire()
    (tmp_path / "run" / train.CHECKPOINT_DIR).write_text("not a folder")
    with pytest.raises(train.RunWriteError) as failed:
        run_dir.save_checkpoint({"epoch": 1}, 1)
    assert str(failed.value) == f"could not write {tmp_path / 'run' / train.CHECKPOINT_DIR / 'epoch-0001.pt'} (File exists)"

    def no_plot(path):
        raise PermissionError(13, "Permission denied")

    assert run_dir.write_plot(no_plot) is None and run_dir.write_plot(no_plot) is None
    assert len(warnings) == 2
    assert warnings[1] == f"warning: could not write {tmp_path / 'run' / train.PLOT_FILE} (Permission denied); the run goes on"
    run_dir.append({"type": "epoch", "epoch": 2})  # the run goes on
    assert len(whole_json_lines(tmp_path / "run" / train.METRICS_FILE)) == 3
    run_dir.release()


def test_a_run_survives_its_folder_being_deleted_and_its_stdout_closed(workdir):
    out = workdir / "fragile"
    epochs = 30  # long enough that the folder goes while the run is still training
    run = start_child(["train", "--epochs", str(epochs), "--max-batches", "1", "--batch-size", "16", "--no-progress",
                       "--out", str(out)], workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert run.stdout.readline().startswith("data: ")
        run.stdout.close()  # `| head -1`: the reader is gone
        wait_for(lambda: _checkpoint_from(out, 2), "epoch 2")
        shutil.rmtree(out, ignore_errors=True)
        assert run.wait(timeout=120) == 0
        err = run.stderr.read()
    finally:
        if run.poll() is None:
            run.kill()
    assert "Traceback" not in err and "disappeared during the run" in err
    log = whole_json_lines(out / train.METRICS_FILE)
    assert [r["epoch"] for r in log if r["type"] == "epoch"] == list(range(1, epochs + 1))
    assert log[-1]["type"] == "summary" and log[-1]["status"] == "finished"
    assert json.loads((out / train.STATUS_FILE).read_text())["status"] == "finished"
    assert (out / train.PLOT_FILE).is_file() and train.RunDir(out).checkpoints()


def test_plot_redraws_a_run_from_its_log(workdir, capsys):
    out = workdir / "drawn"
    assert run_cli(capsys, "train", "--epochs", "2", *TINY, "--out", out)[0] == 0
    (out / train.PLOT_FILE).unlink()
    code, stdout, err = run_cli(capsys, "plot", out)
    assert code == 0, err
    assert stdout.strip() == f"plot: {out / train.PLOT_FILE}"
    assert (out / train.PLOT_FILE).read_bytes().startswith(b"\x89PNG")
    code, _, err = run_cli(capsys, "plot", workdir / "nothing")
    one_line_error(code, err, "no metrics.jsonl in")


def test_the_first_stop_signal_is_a_request_and_the_second_stops_at_once():
    previous = signal.getsignal(signal.SIGTERM)
    with train.StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.name == "SIGTERM" and stop.exit_code == 143
        assert stop.at_step(1, 0)  # the loop stops before drawing the next batch
        with pytest.raises(train.ForcedStop) as forced:
            os.kill(os.getpid(), signal.SIGINT)
        assert forced.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGTERM) is previous


# ---------------------------------------------------------------- a write that fails

FAILING = ["--epochs", "3", "--max-batches", "2", "--batch-size", "8", "--no-progress"]
# What torch's zip writer raises when the disk fills up under torch.save: no errno, no cause.
TORCH_SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 4800 vs 4736"
NO_SPACE = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _from_call(number, error, original):
    """``original`` for its first ``number - 1`` calls; every later call raises ``error``."""
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) >= number:
            raise error
        return original(*args, **kwargs)

    return failing


def _disk_with_free(monkeypatch, free):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(total=1 << 40, used=(1 << 40) - free, free=free))


def _checkpoint_short_write_on_a_full_disk(monkeypatch, out):
    _disk_with_free(monkeypatch, 12 * 1024)
    # torch.save: the checkpoints after epochs 0 and 1 are written, the one after epoch 2 fails.
    monkeypatch.setattr(torch, "save", _from_call(3, RuntimeError(TORCH_SHORT_WRITE), torch.save))
    return out / train.CHECKPOINT_DIR / "epoch-0002.pt", "no space left on the device: 12.0 KiB free", 1


def _checkpoint_short_write_with_space_left(monkeypatch, out):
    _disk_with_free(monkeypatch, 10 << 30)
    monkeypatch.setattr(torch, "save", _from_call(3, RuntimeError(TORCH_SHORT_WRITE), torch.save))
    return out / train.CHECKPOINT_DIR / "epoch-0002.pt", f"{TORCH_SHORT_WRITE}; 10.0 GiB free on the device", 1


def _checkpoint_no_space(monkeypatch, out):
    monkeypatch.setattr(torch, "save", _from_call(3, NO_SPACE, torch.save))
    return out / train.CHECKPOINT_DIR / "epoch-0002.pt", "No space left on device", 1


def _log_no_space(monkeypatch, out):
    original = os.write
    appends = []

    def write(fd, data):
        try:
            to_log = os.path.samestat(os.fstat(fd), os.stat(out / train.METRICS_FILE))
        except OSError:
            to_log = False
        if to_log:
            appends.append(1)
            if len(appends) >= 2:  # epoch 1's record is written, epoch 2's is not
                raise NO_SPACE
        return original(fd, data)

    monkeypatch.setattr(os, "write", write)
    return out / train.METRICS_FILE, "No space left on device", 2


def _status_no_space(monkeypatch, out):
    from esper_fast.train import run_dir

    original = open
    opened = []

    def status_open(path, *args, **kwargs):
        if Path(path).name.startswith(f".{train.STATUS_FILE}."):
            opened.append(1)
            if len(opened) >= 4:  # written at the start and after epochs 0 and 1; not after epoch 2
                raise NO_SPACE
        return original(path, *args, **kwargs)

    monkeypatch.setattr(run_dir, "open", status_open, raising=False)
    return out / train.STATUS_FILE, "No space left on device", 2


WRITE_FAILURES = [_checkpoint_short_write_on_a_full_disk, _checkpoint_short_write_with_space_left,
                  _checkpoint_no_space, _log_no_space, _status_no_space]


def _assert_stopped_by_a_failed_write(code, err, out, failed_file, cause, last_epoch):
    """One line naming the file, the cause and how to resume; exit 1; the last good
    checkpoint and the log as they were before the failed write."""
    last = out / train.CHECKPOINT_DIR / f"epoch-{last_epoch:04d}.pt"
    assert code == 1 and err.strip().splitlines() == [
        f"esper-fast: error: could not write {failed_file} ({cause}); the run stopped, its last checkpoint is {last}; "
        f"continue with: esper-fast train --resume {out}"
    ], err
    assert train.RunDir(out).checkpoints()[-1] == last
    payload = torch.load(last, weights_only=True)
    assert payload["position"] == {"epochs_done": last_epoch, "steps_done": 0}
    log = whole_json_lines(out / train.METRICS_FILE)
    assert [r["epoch"] for r in log if r["type"] == "epoch"] == [1]
    assert not list(out.glob("**/.*.tmp"))


def _assert_resumes_to_the_end(capsys, out):
    code, stdout, err = run_cli(capsys, "train", "--resume", out)
    assert code == 0, err
    log = whole_json_lines(out / train.METRICS_FILE)
    assert [r["epoch"] for r in log if r["type"] == "epoch"] == [1, 2, 3]
    assert log[-1]["type"] == "summary" and log[-1]["status"] == "finished"
    assert json.loads((out / train.STATUS_FILE).read_text())["status"] == "finished"


@pytest.mark.parametrize("fail", WRITE_FAILURES, ids=[f.__name__.strip("_") for f in WRITE_FAILURES])
def test_a_failed_write_stops_the_run_with_one_line_and_it_resumes(workdir, capsys, fail):
    out = workdir / "full"
    with pytest.MonkeyPatch.context() as patch:
        failed_file, cause, last_epoch = fail(patch, out)
        code, stdout, err = run_cli(capsys, "train", *FAILING, "--out", out)
    _assert_stopped_by_a_failed_write(code, err, out, failed_file, cause, last_epoch)
    # Every epoch the last checkpoint holds was printed, that of a write failing after it
    # too: the resume goes on after it.
    assert [line[:10] for line in stdout.splitlines() if line.startswith("epoch ")] == [
        f"epoch  {epoch}/3" for epoch in range(1, last_epoch + 1)]
    _assert_resumes_to_the_end(capsys, out)


def _can_write_into_a_read_only_folder(folder) -> bool:
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").write_text("")
        return True  # root, or a process with CAP_DAC_OVERRIDE
    except PermissionError:
        return False
    finally:
        folder.chmod(0o755)


def test_a_folder_made_read_only_stops_the_run_with_one_line_and_it_resumes(workdir, capsys):
    if _can_write_into_a_read_only_folder(workdir / "probe"):
        pytest.skip("this process writes into read-only folders (root)")
    out = workdir / "read-only"
    at_step = train.StopSignals.at_step
    folders = (out, out / train.CHECKPOINT_DIR)

    def read_only_from_epoch_2(self, epoch, steps_done):
        if (epoch, steps_done) == (2, 0):
            for folder in folders:
                folder.chmod(0o555)
        return at_step(self, epoch, steps_done)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train.StopSignals, "at_step", read_only_from_epoch_2)
        try:
            code, _, err = run_cli(capsys, "train", *FAILING, "--out", out)
        finally:
            for folder in folders:
                folder.chmod(0o755)
    _assert_stopped_by_a_failed_write(code, err, out, out / train.CHECKPOINT_DIR / "epoch-0002.pt",
                                      "Permission denied", 1)
    _assert_resumes_to_the_end(capsys, out)
