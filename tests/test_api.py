"""Every public name of the API contract imports from where API.md says it lives."""

import importlib

import pytest

CONTRACT = {
    "esper_fast.tolaria": [
        "create_model", "train_epoch_normal", "train_epoch_incubator_mode", "train_epoch_blended",
        "validate_and_get_metrics", "validate_with_attribution", "AttributionResult",
        "TolariaGovernor", "GovernorReport",
    ],
    "esper_fast.tolaria.trainer": [
        "train_epoch_normal", "train_epoch_incubator_mode", "train_epoch_blended",
        "validate_and_get_metrics", "validate_with_attribution", "AttributionResult",
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
