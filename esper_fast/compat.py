"""Run an existing esper-lite program on esper_fast: ``install_as_esper()``.

After the call, importing ``esper.leyline``, ``esper.kasmina``, ``esper.tolaria``,
``esper.runtime`` or ``esper.utils`` (and any of their submodules) yields esper_fast's module
of the same name: the very same module object, so classes, enums and ``isinstance`` agree
whichever name a program uses, and pickles written by esper-lite (checkpoints with a seed's
lifecycle state) load into esper_fast's classes. Every other ``esper.*`` package (simic,
tamiyo, nissa, scripts) still loads from esper-lite when it is installed, and runs on top.
Without esper-lite, a stand-in ``esper`` package holds just the training layer.

From the command line, ``python -m esper_fast.run -m esper.scripts.train heuristic ...``
does the same for a whole program (see :mod:`esper_fast.run`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

__all__ = ["install_as_esper", "ALIASED_PACKAGES"]

# esper-lite's training layer, which esper_fast replaces name for name.
ALIASED_PACKAGES = ("leyline", "kasmina", "tolaria", "runtime", "utils")


def _target_of(fullname: str) -> str | None:
    """``esper.kasmina.slot`` -> ``esper_fast.kasmina.slot``; None for names not aliased."""
    parts = fullname.split(".")
    if len(parts) < 2 or parts[0] != "esper" or parts[1] not in ALIASED_PACKAGES:
        return None
    return "esper_fast." + ".".join(parts[1:])


class _TrainingLayerFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers imports of ``esper.<aliased>...`` with esper_fast's modules."""

    def find_spec(self, fullname, path=None, target=None):
        target_name = _target_of(fullname)
        if target_name is None:
            return None
        target_spec = importlib.util.find_spec(target_name)
        if target_spec is None:
            return None  # a module esper_fast does not have: let the import fail as usual
        return importlib.machinery.ModuleSpec(
            fullname, self, is_package=target_spec.submodule_search_locations is not None
        )

    def create_module(self, spec):
        # The esper_fast module itself; the import machinery keeps its own name and spec.
        return importlib.import_module(_target_of(spec.name))

    def exec_module(self, module):
        pass  # already executed under its esper_fast name


_FINDER = _TrainingLayerFinder()


def _stand_in_esper() -> types.ModuleType:
    module = types.ModuleType(
        "esper", "Stand-in for esper-lite's top package: its training layer, served by esper_fast."
    )
    module.__path__ = []  # a package, with nothing of its own on disk
    module.__spec__ = importlib.machinery.ModuleSpec("esper", None, is_package=True)
    return module


def install_as_esper() -> list[str]:
    """Make ``esper.leyline|kasmina|tolaria|runtime|utils`` import as esper_fast's modules.

    Call it before anything imports ``esper``. Idempotent. Returns the aliased package names.

    Raises:
        RuntimeError: esper-lite's own training-layer modules were imported already; code
            holding them would mix its types with esper_fast's.
    """
    if _FINDER not in sys.meta_path:
        already = sorted(
            name for name, module in sys.modules.items()
            if _target_of(name) is not None and not getattr(module, "__name__", "").startswith("esper_fast")
        )
        if already:
            raise RuntimeError(
                "esper_fast.install_as_esper() must run before esper-lite's training layer is imported; "
                f"already imported: {', '.join(already)}"
            )
        sys.meta_path.insert(0, _FINDER)
    if "esper" not in sys.modules and importlib.util.find_spec("esper") is None:
        sys.modules["esper"] = _stand_in_esper()
    esper = importlib.import_module("esper")
    names = [f"esper.{name}" for name in ALIASED_PACKAGES]
    for name in names:
        setattr(esper, name.split(".")[1], importlib.import_module(name))
    return names
