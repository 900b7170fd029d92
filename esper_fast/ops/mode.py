"""The reference switch: route every fused op and loop to the pure-PyTorch original algorithm.

Used by the end-to-end benchmark to time the original and the fused paths in one process.
Enabled by ``with reference_mode():`` or by the environment variable ``ESPER_FAST_REFERENCE=1``.
It is never switched on implicitly: a missing kernel is an import error, not a fallback.
"""

import contextlib
import os

_reference_depth = 0


def using_reference() -> bool:
    """True inside ``reference_mode()`` or when ``ESPER_FAST_REFERENCE=1``."""
    return _reference_depth > 0 or os.environ.get("ESPER_FAST_REFERENCE", "") == "1"


@contextlib.contextmanager
def reference_mode(enabled: bool = True):
    """Within the block, esper_fast runs the original pure-PyTorch algorithms."""
    global _reference_depth
    if not enabled:
        yield
        return
    _reference_depth += 1
    try:
        yield
    finally:
        _reference_depth -= 1
