"""Write the public API of esper's training layer (names and call signatures) as JSON.

    PYTHONPATH=<esper-lite>/src python tools/api_snapshot.py tests/data/original_api.json
    python tools/api_snapshot.py --esper-fast out.json   # the same, for esper_fast as esper

tests/test_api.py checks esper_fast against the snapshot taken from esper-lite@5146c39a:
every name exists, and every signature starts with the original's parameters (same names,
kinds, defaults, order); esper_fast may add keyword-only options after them.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib
import inspect
import json

MODULES = [
    "esper.leyline", "esper.leyline.actions", "esper.leyline.stages", "esper.leyline.schemas",
    "esper.leyline.reports", "esper.leyline.signals", "esper.leyline.telemetry",
    "esper.kasmina", "esper.kasmina.slot", "esper.kasmina.host", "esper.kasmina.isolation",
    "esper.kasmina.protocol", "esper.kasmina.blueprints", "esper.kasmina.blueprints.registry",
    "esper.kasmina.blueprints.cnn", "esper.kasmina.blueprints.transformer",
    "esper.tolaria", "esper.tolaria.trainer", "esper.tolaria.governor", "esper.tolaria.environment",
    "esper.runtime", "esper.runtime.tasks", "esper.utils", "esper.utils.data",
]


def signature(obj) -> list | None:
    """``["name KIND", "name KIND=repr(default)", ...]`` of a function or class constructor."""
    if inspect.isclass(obj) and (issubclass(obj, enum.Enum) or (
            "__init__" not in obj.__dict__ and not dataclasses.is_dataclass(obj))):
        return None
    if not callable(obj):
        return None
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return None
    return [
        f"{p.name} {p.kind.name}" + ("" if p.default is inspect.Parameter.empty else f"={p.default!r}")
        for p in params if p.name != "self"
    ]


def snapshot() -> dict:
    result = {}
    for name in MODULES:
        module = importlib.import_module(name)
        public = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
        entries = {}
        for attr in sorted(public):
            obj = getattr(module, attr)
            if inspect.ismodule(obj) or attr == "annotations":
                continue
            if callable(obj) and not (getattr(obj, "__module__", "") or "").startswith("esper"):
                continue  # a name imported from torch or the standard library
            entries[attr] = signature(obj)
        result[name] = entries
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--esper-fast", action="store_true", help="snapshot esper_fast installed as esper")
    args = parser.parse_args()
    if args.esper_fast:
        import esper_fast

        esper_fast.install_as_esper()
    with open(args.out, "w") as f:
        json.dump(snapshot(), f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
