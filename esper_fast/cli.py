"""``esper-fast`` (also ``python -m esper_fast``): train, bench, info.

    esper-fast train --task cifar10 --device cpu --epochs 8 --out runs/demo
    esper-fast train --task cifar10 --epochs 6 --inject-nan-at 4      # governor demo
    esper-fast bench -k e2e
    esper-fast info

A user mistake (unknown task or blueprint, CUDA without a GPU, an unwritable --out, a
missing data root) ends the command with one ``esper-fast: error: ...`` line on stderr and
exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from pathlib import Path

EXIT_USAGE = 2
TASKS = ("cifar10", "tinystories")


class CLIError(Exception):
    """A user mistake; the message is the whole explanation, printed as one line."""


class _Parser(argparse.ArgumentParser):
    # argparse's own errors print the usage block and exit; ours print one line.
    def error(self, message):
        raise CLIError(message)


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="esper-fast", description="Esper's training layer on fused kernels.")
    commands = parser.add_subparsers(dest="command", metavar="{train,bench,info}", parser_class=_Parser)

    train = commands.add_parser("train", help="run a full seed lifecycle (offline data, progress, log, plot)")
    train.add_argument("--task", default="cifar10", help=f"one of {', '.join(TASKS)} (default cifar10)")
    train.add_argument("--epochs", type=_positive(int), default=8)
    train.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    train.add_argument("--data-root", default=None,
                       help="folder holding CIFAR-10 in torchvision's format; when omitted, ./data is used "
                            "if it has CIFAR-10, else a generated offline set")
    train.add_argument("--text", dest="text_path", default=None,
                       help="tinystories: a local UTF-8 text file (default: a generated story corpus)")
    train.add_argument("--blueprint", default=None,
                       help="seed blueprint (default conv_light for cifar10, lora for tinystories)")
    train.add_argument("--out", default="runs/latest", help="folder for metrics.jsonl and metrics.png")
    train.add_argument("--seed", type=int, default=0, help="random seed for initialisation and batch order")
    train.add_argument("--max-batches", type=_positive(int), default=None,
                       help="at most this many train and validation batches per epoch")
    train.add_argument("--batch-size", type=_positive(int), default=None)
    train.add_argument("--seq-len", type=_positive(int), default=None, help="tinystories sequence length")
    train.add_argument("--lr", type=_positive(float), default=None)
    train.add_argument("--compile", action="store_true", help="torch.compile the model")
    train.add_argument("--inject-nan-at", type=_positive(int), default=None, metavar="EPOCH",
                       help="make one training step of this epoch produce NaN (the governor rolls back)")
    train.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    bench = commands.add_parser("bench", help="run the benchmarks and print the fast/reference ratio table")
    bench.add_argument("-k", dest="keyword", default=None, help="only benchmarks matching this pytest -k expression")
    bench.add_argument("--save", action="store_true",
                       help="save the run under benchmarks/.results and compare with the last saved run")

    commands.add_parser("info", help="versions, device, compiled kernels, reference switch")
    return parser


# ---------------------------------------------------------------- train

def _check_device(device: str) -> None:
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise CLIError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {device} asked for CUDA, but CUDA is not available here; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise CLIError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif parsed.type != "cpu":
        raise CLIError(f"unsupported device {device!r}; use cpu, cuda or cuda:N")


def _check_out(out: str) -> None:
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".esper-fast-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise CLIError(f"--out {out} is not a writable folder ({exc.strerror or exc})")


def _train(args) -> int:
    from esper_fast import data, lifecycle

    if args.task not in TASKS:
        raise CLIError(f"unknown task {args.task!r}; choose one of: {', '.join(TASKS)}")
    from esper_fast.runtime import get_task_spec

    try:
        spec = get_task_spec(args.task)
    except ValueError as exc:
        raise CLIError(str(exc))
    from esper_fast.kasmina import BlueprintRegistry

    choices = BlueprintRegistry.names(spec.topology)
    if args.blueprint is not None and args.blueprint not in choices:
        raise CLIError(
            f"unknown blueprint {args.blueprint!r} for {args.task} ({spec.topology} host); choose one of: {', '.join(choices)}"
        )
    if args.data_root is not None and args.task != "cifar10":
        raise CLIError("--data-root applies to --task cifar10; for tinystories give a text file with --text")
    if args.text_path is not None and args.task != "tinystories":
        raise CLIError("--text applies to --task tinystories")
    _check_device(args.device)
    _check_out(args.out)
    if args.inject_nan_at is not None and args.inject_nan_at > args.epochs:
        raise CLIError(f"--inject-nan-at {args.inject_nan_at} is after the last epoch ({args.epochs})")

    config = lifecycle.RunConfig(
        task=args.task, epochs=args.epochs, device=args.device, data_root=args.data_root,
        text_path=args.text_path, blueprint=args.blueprint, out=args.out, seed=args.seed,
        max_batches=args.max_batches, compile=args.compile, inject_nan_at=args.inject_nan_at,
        batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, progress=args.progress,
    )
    try:
        lifecycle.run(config, echo=lambda line: print(line, flush=True))
    except data.DataError as exc:
        raise CLIError(str(exc))
    except RuntimeError as exc:
        if "CUDA" in str(exc) and "not available" in str(exc):
            raise CLIError(str(exc).splitlines()[0])
        raise
    return 0


# ---------------------------------------------------------------- bench

def _bench(args) -> int:
    benchmarks = Path(__file__).resolve().parent.parent / "benchmarks"
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
    import torch

    import esper_fast
    from esper_fast.ops.mode import using_reference

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
    """Runs one command; returns the process exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        return {"train": _train, "bench": _bench, "info": _info}[args.command](args)
    except CLIError as exc:
        print(f"esper-fast: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        print("esper-fast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
