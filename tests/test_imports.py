"""Imports flow one way (ops <- kasmina <- tolaria <- train): importing a lower floor loads
nothing above it, and the package root re-exports lazily."""

import subprocess
import sys

import pytest

# What each floor may load of the package: itself, the floors below it and the extension.
FLOORS = {
    "esper_fast.ops": ("esper_fast.ops",),
    "esper_fast.leyline": ("esper_fast.leyline",),
    "esper_fast.kasmina": ("esper_fast.ops", "esper_fast.leyline", "esper_fast.kasmina"),
}


def _loaded_after(statement: str) -> list[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(m for m in sys.modules if m.startswith('esper_fast'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.mark.parametrize("floor", sorted(FLOORS))
def test_a_floor_loads_nothing_above_it(floor):
    allowed = ("esper_fast", "esper_fast._C") + FLOORS[floor]
    loaded = _loaded_after(f"import {floor}")
    above = [m for m in loaded if m not in allowed and not m.startswith(tuple(f"{a}." for a in FLOORS[floor]))]
    assert not above, f"import {floor} loaded {above}"


def test_import_ops_loads_no_training_code():
    loaded = _loaded_after("import esper_fast.ops")
    training = [m for m in loaded if m.startswith(("esper_fast.kasmina", "esper_fast.tolaria", "esper_fast.train",
                                                    "esper_fast.runtime", "esper_fast.leyline", "esper_fast.utils"))]
    assert not training, training
    assert "esper_fast.ops.metrics" in loaded and "esper_fast._C" in loaded


def test_the_root_reexports_lazily():
    import esper_fast
    import esper_fast.tolaria as tolaria

    assert set(tolaria.__all__) <= set(esper_fast.__all__)
    assert set(esper_fast.__all__) <= set(dir(esper_fast))
    assert esper_fast.install_as_esper is __import__("esper_fast.compat").compat.install_as_esper
    with pytest.raises(AttributeError):
        esper_fast.no_such_name
    namespace = {}
    exec("from esper_fast import *", namespace)
    assert namespace["validate_epoch"] is tolaria.validate_epoch
