"""esper_fast: Esper's training layer (Tolaria + the Kasmina pieces it needs) on fused kernels.

Importing the package loads the compiled extension ``esper_fast._C``, which registers the
``torch.ops.esper_fast`` operators. There is no pure-Python fallback: if the extension is
missing the import fails and says how to build it.

Everything else is loaded on first use (module ``__getattr__``): ``import esper_fast.ops``
loads the operators and no training code, so imports flow one way, ops <- kasmina <- tolaria
<- train, and none runs back up through this package.
"""

import importlib

import torch

try:
    from esper_fast import _C  # noqa: F401  (registers torch.ops.esper_fast.*)
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "esper_fast: the compiled extension esper_fast._C could not be loaded "
        f"({exc}). Build it with `pip install --no-build-isolation -e .` "
        "(or `make build`) against the torch in this environment."
    ) from exc

__version__ = "0.1.0"

# esper_fast.tolaria.__all__, re-exported here (checked against it by tests/test_api.py).
_TOLARIA_NAMES = (
    "create_model",
    "train_epoch_normal",
    "train_epoch_incubator_mode",
    "train_epoch_blended",
    "validate_and_get_metrics",
    "validate_with_attribution",
    "AttributionResult",
    "validate_epoch",
    "EpochValidation",
    "slot_attribution",
    "SlotAttribution",
    "TolariaGovernor",
    "GovernorReport",
    "judge_candidates",
    "Judgement",
    "CandidateValue",
)
# name -> the module that defines it, imported at the first access.
_LAZY = {
    **dict.fromkeys(_TOLARIA_NAMES, "esper_fast.tolaria"),
    "install_as_esper": "esper_fast.compat",
}
_SUBMODULES = ("ops",)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"esper_fast.{name}")
    else:
        raise AttributeError(f"module 'esper_fast' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


def kernels_available() -> dict:
    """Which kernels the compiled extension carries: ``{"cpu": [...ops], "cuda": [...ops]}``.

    ``cuda`` lists the operators with a CUDA kernel compiled in, whether or not a GPU is
    present; ``torch.cuda.is_available()`` says whether they can run.
    """
    names = sorted(
        name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("esper_fast::")
    )
    result = {}
    for backend in ("CPU", "CUDA"):
        result[backend.lower()] = [
            name for name in names if torch._C._dispatch_has_kernel_for_dispatch_key(f"esper_fast::{name}", backend)
        ]
    return result


def extension_path() -> str:
    """File system path of the loaded extension library."""
    return _C.__file__


__all__ = list(_TOLARIA_NAMES) + ["kernels_available", "extension_path", "ops", "install_as_esper"]
