"""Run an esper-lite program with esper_fast as its training layer.

    python -m esper_fast.run -m esper.scripts.train heuristic --task cifar10 ...
    python -m esper_fast.run my_experiment.py --my-flag

Calls :func:`esper_fast.install_as_esper` and then runs the module (``-m NAME``) or the
script as ``__main__`` with the remaining arguments, exactly as ``python -m NAME ...`` or
``python SCRIPT ...`` would.
"""

from __future__ import annotations

import runpy
import sys

USAGE = "usage: python -m esper_fast.run (-m MODULE | SCRIPT) [ARGS...]"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or (argv[0] == "-m" and len(argv) < 2):
        print(USAGE + "\n\n" + __doc__.strip().splitlines()[0], file=sys.stderr if not argv else sys.stdout)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)

    from esper_fast.compat import install_as_esper

    install_as_esper()
    if argv[0] == "-m":
        module, args = argv[1], argv[2:]
        sys.argv = [module] + args
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        script, args = argv[0], argv[1:]
        sys.argv = [script] + args
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
