"""esper_fast: Esper's training layer (Tolaria + the Kasmina pieces it needs) on fused kernels.

Importing the package loads the compiled extension ``esper_fast._C``, which registers the
``torch.ops.esper_fast`` operators. There is no pure-Python fallback: if the extension is
missing the import fails and says how to build it.
"""

import torch

try:
    from esper_fast import _C  # noqa: F401  (registers torch.ops.esper_fast.*)
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "esper_fast: the compiled extension esper_fast._C could not be loaded "
        f"({exc}). Build it with `pip install --no-build-isolation -e .` "
        "(or `make build`) against the torch in this environment."
    ) from exc

from esper_fast import ops  # noqa: E402
from esper_fast.compat import install_as_esper  # noqa: E402
from esper_fast.tolaria import *  # noqa: E402,F401,F403
from esper_fast.tolaria import __all__ as _tolaria_all  # noqa: E402

__version__ = "0.1.0"


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


__all__ = list(_tolaria_all) + ["kernels_available", "extension_path", "ops", "install_as_esper"]
