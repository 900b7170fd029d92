"""Every public name of the API contract imports from where API.md says it lives."""

import importlib
import inspect
import json
from pathlib import Path

import pytest

CONTRACT = {
    "esper_fast.tolaria": [
        "create_model", "train_epoch_normal", "train_epoch_incubator_mode", "train_epoch_blended",
        "validate_and_get_metrics", "validate_with_attribution", "AttributionResult",
        "validate_epoch", "EpochValidation", "slot_attribution", "SlotAttribution", "TolariaGovernor", "GovernorReport",
        "judge_candidates", "Judgement", "CandidateValue",
    ],
    "esper_fast.tolaria.trainer": [
        "train_epoch_normal", "train_epoch_incubator_mode", "train_epoch_blended",
        "validate_and_get_metrics", "validate_with_attribution", "AttributionResult",
        "validate_epoch", "EpochValidation", "slot_attribution", "SlotAttribution",
    ],
    "esper_fast.tolaria.governor": ["TolariaGovernor", "GovernorReport"],
    "esper_fast.kasmina": [
        "MorphogeneticModel", "CNNHost", "TransformerHost", "SeedSlot", "SeedState", "SeedMetrics",
        "SeedStage", "QualityGates", "BlueprintRegistry", "AlphaSchedule", "blend_with_isolation", "ste_forward",
    ],
    "esper_fast.kasmina.slot": ["SeedSlot", "SeedState", "SeedStage", "SeedMetrics", "QualityGates"],
    "esper_fast.runtime": ["TaskSpec", "get_task_spec"],
    "esper_fast.ops": ["blend", "ste", "MetricsAccumulator", "HostSnapshot", "reference_mode"],
}


@pytest.mark.parametrize("module,name", [(m, n) for m, names in CONTRACT.items() for n in names])
def test_contract_name_imports(module, name):
    assert hasattr(importlib.import_module(module), name), f"{module}.{name} is missing"


def test_top_level_reexports_tolaria():
    import esper_fast
    import esper_fast.tolaria as tolaria

    for name in tolaria.__all__:
        assert getattr(esper_fast, name) is getattr(tolaria, name)
    assert callable(esper_fast.kernels_available)


def test_tolaria_all_matches_contract():
    import esper_fast.tolaria as tolaria

    assert set(tolaria.__all__) == set(CONTRACT["esper_fast.tolaria"])


# ---------------------------------------------------------------- the original's API, name for name

# Public names and signatures of esper-lite@5146c39a's training layer, written by
# tools/api_snapshot.py from the original (a record of its interface, no code of it).
ORIGINAL_API = json.loads((Path(__file__).parent / "data" / "original_api.json").read_text())
_ENTRIES = [(module, name, sig) for module, names in ORIGINAL_API.items() for name, sig in names.items()]


def _esper_fast_module(esper_name: str):
    return importlib.import_module("esper_fast" + esper_name[len("esper"):])


def _signature(obj) -> list[str]:
    return [
        f"{p.name} {p.kind.name}" + ("" if p.default is inspect.Parameter.empty else f"={p.default!r}")
        for p in inspect.signature(obj).parameters.values() if p.name != "self"
    ]


def test_the_snapshot_covers_the_whole_training_layer():
    assert len(_ENTRIES) > 150
    assert {m.split(".")[1] for m in ORIGINAL_API} == {"leyline", "kasmina", "tolaria", "runtime", "utils"}


@pytest.mark.parametrize("module,name,original", _ENTRIES, ids=[f"{m}.{n}" for m, n, _ in _ENTRIES])
def test_every_original_name_exists_with_a_compatible_signature(module, name, original):
    obj = getattr(_esper_fast_module(module), name, None)
    assert obj is not None, f"esper_fast{module[len('esper'):]}.{name} is missing"
    if original is None:
        return
    ours = _signature(obj)
    assert ours[: len(original)] == original, f"signature of {name}: {ours} does not start with {original}"
    # Anything added after the original's parameters must be keyword-only with a default.
    for extra in ours[len(original):]:
        assert " KEYWORD_ONLY=" in extra or " VAR_" in extra, f"{name}: added parameter {extra!r} is not an option"
