"""``esper-fast`` (also ``python -m esper_fast``): train, plot, bench, info.

    esper-fast train --task cifar10 --device cpu --epochs 8 --out runs/demo
    esper-fast train --task cifar10 --epochs 6 --inject-nan-at 4      # governor demo
    esper-fast train --slots block2_post,block3_post --out runs/two   # a seed in each of two slots
    esper-fast train --candidates conv_light,depthwise,attention,norm # four blueprints incubated at once
    esper-fast train --resume runs/demo                               # continue a stopped run
    esper-fast train --nproc 2 --out runs/ddp                         # 2 processes (torchrun + DDP)
    torchrun --standalone --nproc-per-node 2 -m esper_fast train --out runs/ddp   # the same, by hand
    esper-fast plot runs/demo                                         # redraw its plot
    esper-fast bench -k e2e
    esper-fast info

A user mistake (a bad or inapplicable flag, unknown task or blueprint, CUDA without a GPU, an
unwritable --out, a folder that holds another run or is in use, a missing data root or text
file) ends the command with one ``esper-fast: error: ...`` line on stderr and exit status
2, never a traceback. A run stopped by SIGINT or SIGTERM exits 130 or 143 after saving
everything, with a line saying how to resume it. A run that cannot write a checkpoint,
run.json or metrics.jsonl (a full disk, a read-only folder) exits 1 after one such line
naming the file, the cause and how to resume it. Under torchrun only rank 0 prints; under
``--nproc`` (:mod:`esper_fast.train.launch`) that is all the user sees, the same lines and exit
status as one process, and ``esper-fast train --resume DIR`` resumes any run, on as many
processes as it started with.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import torch.distributed as dist

import esper_fast
from esper_fast.kasmina import BlueprintRegistry
from esper_fast.ops.mode import using_reference
from esper_fast.runtime import get_task_spec
from esper_fast.train.command import RESUME_OVERRIDES, check_out, train
from esper_fast.train.settings import (
    DEFAULT_KEEP_CHECKPOINTS,
    DEFAULT_OUT,
    TASK_DEFAULTS,
    TASKS,
    RunConfig,
    SettingsError,
    check_device,
    check_trainable,
    task_slots,
    with_slots,
)
from esper_fast.train.console import pipe_safe_streams
from esper_fast.train.datasets import DataError, read_text_bytes
from esper_fast.train.launch import LAUNCH_COMMAND_ENV, attach_console, launch
from esper_fast.train.plotting import plot_log
from esper_fast.train.ranks import launched_rank, launched_world_size
from esper_fast.train.run_dir import METRICS_FILE, PLOT_FILE, RunDirError, read_status

EXIT_USAGE = 2
MAX_SEED = 2**64 - 1  # torch's generators take seeds in [0, 2**64)
# The source checkout this package sits in (where ``bench`` finds benchmarks/).
SOURCE_ROOT = Path(__file__).resolve().parents[2]


class CLIError(Exception):
    """A user mistake; the message is the whole explanation, printed as one line."""


class _Parser(argparse.ArgumentParser):
    # argparse's own errors print the usage block and exit; ours print one line.
    def error(self, message):
        raise CLIError(message)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=30)


def _number(convert, accept, expected: str, unparsable: str | None = None):
    """An argparse type: ``convert(text)``, refused with ``expected`` unless ``accept(value)``
    (with ``unparsable``, when given, for text that is no number at all)."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{unparsable or expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}")
        return value

    return parse


_positive_int = _number(int, lambda v: v > 0, "expected a positive int")
_learning_rate = _number(float, lambda v: math.isfinite(v) and v > 0, "expected a finite positive number")
_seed = _number(int, lambda v: 0 <= v <= MAX_SEED, f"a seed is an integer from 0 to 2**64-1 ({MAX_SEED})",
                "expected an integer seed")
_rank = _number(int, lambda v: v >= 0, "expected a rank (an int from 0)")


def _folder(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a folder name, got an empty string")
    return text


def _names(text: str) -> list[str]:
    """A comma-separated list of names (``--slots``, ``--blueprint``)."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected names separated by commas, got {text!r}")
    return names


def _slot_lines() -> list[str]:
    lines = []
    for task in TASKS:
        points, default = task_slots(task)
        names = [f"{p} (default)" if p == default else p for p in points]
        lines += textwrap.wrap(f"{task}: {', '.join(names)}", 100, initial_indent="  ", subsequent_indent="    ")
    return lines


def _blueprint_lines() -> list[str]:
    lines = []
    for task, defaults in TASK_DEFAULTS.items():
        topology = get_task_spec(task).topology
        names = [f"{n} (default)" if n == defaults["blueprint"] else n for n in BlueprintRegistry.names(topology)]
        lines.append(f"  {task} ({topology} host): {', '.join(names)}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="esper-fast", description="Esper's training layer on fused kernels.")
    parser.add_argument("--version", action="version",
                        version=f"esper-fast {esper_fast.__version__} (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})")
    commands = parser.add_subparsers(dest="command", metavar="{train,plot,bench,info}", parser_class=_Parser)

    d = RunConfig()
    epilog = "\n".join([
        "blueprints (--blueprint, --candidates) per task:", *_blueprint_lines(), "",
        "slots (--slots) per task, in the host's order:", *_slot_lines(), "",
        "Several slots: every slot runs the lifecycle on its own, under the same rules. Every empty slot",
        "germinates at the same epoch-end (when validation accuracy plateaus, and again after a cull if a",
        "whole lifecycle still fits); a training step runs every slot in its own stage (TRAINING seeds",
        "through the straight-through estimator, the others blended at their own alpha), each seed with its",
        "own optimizer; each seed is judged by its Shapley value over the live seeds (of accuracy; for",
        "tinystories of the validation loss it removes, in nats), fossilized when",
        "it is above 0 and culled otherwise (exact up to 4 seeds; above, sampled, and its 95% lower bound must",
        "be above 0); a governor rollback culls every live seed. Each epoch line is followed by a line per",
        "slot (its seed, stage, alpha and Shapley value in points), the slot's events indented under it.",
        "",
        "A run owns its --out folder: metrics.jsonl (the log), metrics.png, run.json (status) and",
        "checkpoints/. A folder holding a run is never written over: continue it with --resume DIR or",
        "replace it with --overwrite. SIGINT/SIGTERM stop after the current step, saving everything.",
        "",
        "Several processes: --nproc N launches `torchrun --standalone --nproc-per-node N` on this machine",
        "(or start `torchrun ... -m esper_fast train ...` yourself): DistributedDataParallel, gloo on cpu,",
        "NCCL on cuda (one GPU per process), --batch-size per process, each rank on its shard of the data,",
        "every lifecycle and governor decision the same on every rank; rank 0 alone prints and writes --out",
        "(what torchrun and the other ranks print goes to --out/processes.log). --resume DIR runs on as many",
        "processes as the run started with.",
    ])
    train_parser = commands.add_parser(
        "train", help="run a full seed lifecycle (offline data, progress, log, plot, checkpoints)",
        formatter_class=_HelpFormatter, epilog=epilog, argument_default=argparse.SUPPRESS,
    )
    train_parser.add_argument("--task", help=f"one of {', '.join(TASKS)} (default: {d.task})")
    train_parser.add_argument("--epochs", type=_positive_int, metavar="N", help=f"epochs to train (default: {d.epochs})")
    train_parser.add_argument("--device", help=f"cpu, cuda or cuda:N (default: {d.device})")
    train_parser.add_argument("--data-root", metavar="DIR",
                              help="cifar10: a folder holding CIFAR-10 in torchvision's format (cifar-10-batches-py/); "
                                   "it must be there. Default: ./data if it holds CIFAR-10, else a generated offline set")
    train_parser.add_argument("--text", dest="text_path", metavar="FILE",
                              help="tinystories: a local file, read as bytes (one token per byte). "
                                   "Default: a generated story corpus")
    train_parser.add_argument("--blueprint", metavar="NAME[,NAME...]",
                              help="seed blueprint, for every slot, or one per slot of --slots in its order; the "
                                   "choices per task are listed below (default: conv_light for cifar10, lora for "
                                   "tinystories)")
    train_parser.add_argument("--candidates", metavar="NAME,NAME[,...][/...]",
                              help="blueprints incubated together in each slot, the best at alpha 1 on the "
                                   "validation set continuing its lifecycle (instead of --blueprint); one set for "
                                   "every slot, or one per slot of --slots in its order, separated by /")
    train_parser.add_argument("--slots", type=_names, metavar="ID[,ID...]",
                              help="the seed slots, each with a lifecycle of its own; the injection points per task are "
                                   "listed below (default: the task's one slot, block2_post for cifar10, "
                                   "layer_0_post_block for tinystories)")
    train_parser.add_argument("--out", type=_folder, metavar="DIR", help=f"the run folder (default: {DEFAULT_OUT})")
    train_parser.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    train_parser.add_argument("--resume", type=_folder, metavar="DIR",
                              help="continue the run in DIR from its last checkpoint, with its own settings and "
                                   "as many processes as it started with (only --device, --no-progress, "
                                   "--keep-checkpoints and --nproc, which must be the run's, may be given with it)")
    train_parser.add_argument("--seed", type=_seed, help=f"random seed for initialisation and batch order, 0 to 2**64-1 (default: {d.seed})")
    train_parser.add_argument("--max-batches", type=_positive_int, metavar="N",
                              help="at most N train and validation batches per epoch (default: all)")
    train_parser.add_argument("--batch-size", type=_positive_int, metavar="N",
                              help="batch size (default: 128 for cifar10; 8 on CPU, 32 on CUDA for tinystories)")
    train_parser.add_argument("--seq-len", type=_positive_int, metavar="N",
                              help="tinystories: tokens per sequence, at most 256 (default: 64 on CPU, 256 on CUDA)")
    train_parser.add_argument("--lr", type=_learning_rate,
                              help="peak learning rate, cosine-decayed over the run (default: 0.05 for cifar10 (SGD), "
                                   "3e-4 for tinystories (AdamW))")
    train_parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    train_parser.add_argument("--inject-nan-at", type=_positive_int, metavar="EPOCH",
                              help="make one training step of this epoch produce NaN (the governor rolls back)")
    train_parser.add_argument("--inject-nan-rank", type=_rank, metavar="RANK",
                              help=f"with several processes: the rank whose step produces NaN; every rank rolls back "
                                   f"(default: {d.inject_nan_rank})")
    train_parser.add_argument("--nproc", type=_positive_int, metavar="N",
                              help="train on N processes of this machine (launches torchrun --standalone; default: 1, "
                                   "no torch.distributed)")
    train_parser.add_argument("--keep-checkpoints", type=_positive_int, metavar="N",
                              help=f"checkpoints kept in --out/checkpoints (default: {DEFAULT_KEEP_CHECKPOINTS})")
    train_parser.add_argument("--no-progress", dest="progress", action="store_false",
                              help="no progress bars (for logs and pipes): one line per epoch only")

    plot = commands.add_parser("plot", help="redraw a run's metrics.png from its metrics.jsonl")
    plot.add_argument("run", type=_folder, metavar="DIR", help="the run folder")
    plot.add_argument("--out", dest="png", default=None, metavar="FILE", help="where to write the PNG (default: DIR/metrics.png)")

    bench = commands.add_parser("bench", help="run the benchmarks and print the fast/reference ratio table (source checkout)")
    bench.add_argument("-k", dest="keyword", default=None, help="only benchmarks matching this pytest -k expression")
    bench.add_argument("--save", action="store_true",
                       help="save the run under benchmarks/.results and compare with the last saved run")

    commands.add_parser("info", help="versions, device, compiled kernels, reference switch")
    return parser


# ---------------------------------------------------------------- train

def _check_device(device: str) -> None:
    try:
        check_device(device)
    except SettingsError as exc:
        raise CLIError(str(exc))


def _check_world(config_device: str, world: int) -> None:
    """The device checks of a run of ``world`` processes (one GPU per process on CUDA)."""
    if world == 1 or not config_device.startswith("cuda"):
        return
    if torch.device(config_device).index is not None:
        raise CLIError(f"--device {config_device}: with several processes give --device cuda (each process uses "
                       "cuda:LOCAL_RANK)")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if local > torch.cuda.device_count():
        raise CLIError(f"{local} processes on cuda need {local} GPUs, this machine has {torch.cuda.device_count()}")


def _flag(dest: str) -> str:
    return {"text_path": "--text", "progress": "--no-progress"}.get(dest, "--" + dest.replace("_", "-"))


def _run_config(given: dict, world: int = 1):
    """The RunConfig of a new run of ``world`` processes from the flags given; every check
    that needs no data."""
    config = RunConfig(**given)
    if config.task not in TASKS:
        raise CLIError(f"unknown task {config.task!r}; choose one of: {', '.join(TASKS)}")
    spec = get_task_spec(config.task)
    try:
        config = with_slots(config, spec.topology)
    except SettingsError as exc:
        raise CLIError(str(exc))
    only = {"data_root": "cifar10", "text_path": "tinystories", "seq_len": "tinystories"}
    for dest, task in only.items():
        if dest in given and config.task != task:
            hint = "; for tinystories give a text file with --text" if dest == "data_root" else ""
            raise CLIError(f"{_flag(dest)} applies to --task {task}, not {config.task}{hint}")
    if config.seq_len is not None and spec.block_size and config.seq_len > spec.block_size:
        raise CLIError(f"--seq-len {config.seq_len} exceeds the model's block size {spec.block_size}")
    if config.text_path is not None:
        try:
            read_text_bytes(config.text_path)
        except DataError as exc:
            raise CLIError(str(exc))
    if config.inject_nan_at is not None and config.inject_nan_at > config.epochs:
        raise CLIError(f"--inject-nan-at {config.inject_nan_at} is after the last epoch ({config.epochs})")
    if "inject_nan_rank" in given:
        if config.inject_nan_at is None:
            raise CLIError("--inject-nan-rank needs --inject-nan-at")
        if config.inject_nan_rank >= world:
            raise CLIError(f"--inject-nan-rank {config.inject_nan_rank}: the run has {world} process(es), "
                           f"ranks 0 to {world - 1}")
    _check_device(config.device)
    _check_world(config.device, world)
    try:
        check_trainable(config, spec.topology)
    except SettingsError as exc:
        raise CLIError(str(exc))
    # Data paths are recorded absolute, so that --resume works from any folder.
    for dest in ("data_root", "text_path"):
        if getattr(config, dest) is not None:
            setattr(config, dest, os.path.abspath(getattr(config, dest)))
    return config


def _recorded_world_size(folder: str) -> int | None:
    """The number of processes the run in ``folder`` was started with (its run.json; None
    when there is no readable run.json)."""
    try:
        return int((read_status(folder) or {})["world_size"])
    except (KeyError, ValueError, TypeError):
        return None


def _train(args, argv: list[str]) -> int:
    given = {k: v for k, v in vars(args).items() if k != "command"}
    overwrite = given.pop("overwrite", False)
    resume = given.pop("resume", None)
    nproc = given.pop("nproc", None)
    # Under `esper-fast train --nproc N` the log records the command as typed.
    command = os.environ.get(LAUNCH_COMMAND_ENV) or shlex.join(["esper-fast", *argv])
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    launched = launched_world_size() if under_torchrun else 1
    if nproc is not None and under_torchrun and nproc != launched:
        raise CLIError(f"--nproc {nproc} but torchrun started {launched} processes; under torchrun leave --nproc out")
    world = launched if under_torchrun else (nproc or 1)
    if resume is not None:
        # A resumed run takes as many processes as it started with: `--resume DIR` is the
        # whole command, whatever the run's world size (--nproc, if given, must agree).
        extra = [_flag(k) for k in given if k not in RESUME_OVERRIDES]
        if overwrite:
            extra.insert(0, "--overwrite")
        if extra:
            raise CLIError(f"--resume continues a run with the settings it started with; drop {', '.join(extra)}")
        if "device" in given:
            _check_device(given["device"])
        recorded = _recorded_world_size(resume)
        if recorded is not None and (under_torchrun or nproc is not None) and recorded != world:
            if under_torchrun:
                how = f"with torchrun --nproc-per-node {recorded}" if recorded > 1 else "in one process, without torchrun"
            else:
                how = f"with --nproc {recorded}, or leave --nproc out"
            raise CLIError(f"the run in {resume} was started with {recorded} process(es); resume it {how}")
        if recorded is not None and not under_torchrun:
            world = nproc = recorded
        config = None
    else:
        config = _run_config(given, world)
    try:
        if world > 1 and not under_torchrun:
            out = resume or config.out
            check_out(out, resume=resume is not None, overwrite=overwrite)
            if not dist.is_available():
                raise CLIError("--nproc needs torch.distributed, which this torch build lacks")
            return launch(nproc, argv, out)
        return train(config, resume=resume, overrides=given if resume else None, overwrite=overwrite, command=command)
    except (DataError, RunDirError) as exc:
        raise CLIError(str(exc))
    except RuntimeError as exc:
        if "CUDA" in str(exc) and "not available" in str(exc):
            raise CLIError(str(exc).splitlines()[0])
        raise


# ---------------------------------------------------------------- plot

def _plot(args) -> int:
    log = Path(args.run) / METRICS_FILE
    if not log.is_file():
        raise CLIError(f"no {METRICS_FILE} in {args.run}; give the folder of a run (its --out)")
    target = Path(args.png) if args.png else Path(args.run) / PLOT_FILE
    try:
        path = plot_log(log, target)
    except ValueError as exc:
        raise CLIError(str(exc))
    except OSError as exc:
        raise CLIError(f"cannot write {target} ({exc.strerror or exc})")
    print(f"plot: {path}")
    return 0


# ---------------------------------------------------------------- bench

def _bench(args) -> int:
    benchmarks = SOURCE_ROOT / "benchmarks"
    if not (benchmarks / "conftest.py").is_file():
        raise CLIError(f"no benchmarks folder next to the package ({benchmarks}); run from a source checkout")
    try:
        import pytest_benchmark  # noqa: F401
    except ImportError:
        raise CLIError("bench needs pytest and pytest-benchmark (pip install esper_fast[dev])")
    # The benchmark modules are named bench_*.py, not test_*.py.
    command = [sys.executable, "-m", "pytest", str(benchmarks), "-o", "python_files=bench_*.py", "--benchmark-only", "-q",
               "--benchmark-group-by=group", "--benchmark-columns=median,iqr,rounds"]
    if args.keyword:
        command += ["-k", args.keyword]
    if args.save:
        command += ["--benchmark-autosave", f"--benchmark-storage={benchmarks / '.results'}", "--benchmark-compare"]
    print("running:", " ".join(command), flush=True)
    return subprocess.call(command, cwd=benchmarks.parent)


# ---------------------------------------------------------------- info

def info_lines() -> list[str]:
    try:
        import torchvision

        vision = torchvision.__version__
    except ImportError:
        vision = "not installed"
    cuda_build = torch.version.cuda or "none"
    lines = [
        f"esper_fast {esper_fast.__version__} ({esper_fast.extension_path()})",
        f"torch {torch.__version__} (CUDA build {cuda_build}), torchvision {vision}, python {platform.python_version()}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"device cuda:{i}: {props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)")
    else:
        lines.append("device: cpu only (CUDA not available)")
    lines.append(f"cpu threads: {torch.get_num_threads()} of {os.cpu_count()} cores")
    kernels = esper_fast.kernels_available()
    for backend in ("cpu", "cuda"):
        lines.append(f"kernels compiled for {backend}: {', '.join(kernels.get(backend, [])) or 'none'}")
    if using_reference():
        lines.append("reference switch: ON (ESPER_FAST_REFERENCE=1): the original pure-PyTorch algorithms run")
    else:
        lines.append("reference switch: off (the fused kernels run)")
    return lines


def _info(args) -> int:
    for line in info_lines():
        print(line)
    return 0


# ---------------------------------------------------------------- entry point

def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns the process exit status. A closed stdout or stderr (a pipe
    into ``head``) never ends the command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    attach_console()
    with pipe_safe_streams():
        try:
            parser = build_parser()
            args = parser.parse_args(argv)
            if args.command is None:
                parser.print_help()
                return EXIT_USAGE
            if args.command == "train":
                return _train(args, argv)
            return {"plot": _plot, "bench": _bench, "info": _info}[args.command](args)
        except CLIError as exc:
            if launched_rank() == 0:  # under torchrun every rank finds the mistake; one says it
                print(f"esper-fast: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except SystemExit as exc:  # --help, --version
            return exc.code if isinstance(exc.code, int) else 0
        except KeyboardInterrupt:
            print("esper-fast: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
