"""The packages together: the governor, the trainer and the fused ops on a real MorphogeneticModel."""

import pytest
import torch
import torch.nn as nn

from esper_fast.kasmina import CNNHost, MorphogeneticModel, SeedStage
from esper_fast.tolaria import TolariaGovernor


def _model_with_seed(stage: SeedStage) -> MorphogeneticModel:
    model = MorphogeneticModel(CNNHost(num_classes=10, base_channels=8))
    model.germinate_seed("conv_light", "seed-1")
    slot = model.seed_slot
    for target in (SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.SHADOWING, SeedStage.PROBATIONARY,
                   SeedStage.FOSSILIZED):
        if slot.state.stage >= stage:
            break
        slot.state.transition(target)
    assert slot.state.stage == stage
    return model


def _seed_keys(model):
    return {key for key in model.state_dict() if ".seed." in key or key.startswith("seed_slot.seed")}


def test_live_seed_is_left_out_of_the_snapshot_under_every_name():
    model = _model_with_seed(SeedStage.TRAINING)
    seed_keys = _seed_keys(model)
    assert any(k.startswith("seed_slot.") for k in seed_keys) and any(k.startswith("host.") for k in seed_keys)
    governor = TolariaGovernor(model)
    assert not seed_keys & set(governor.last_good_state)


def test_rollback_with_live_seed_culls_and_restores_host():
    model = _model_with_seed(SeedStage.BLENDING)
    governor = TolariaGovernor(model)
    before = {k: v.clone() for k, v in model.state_dict().items() if k not in _seed_keys(model)}
    parameters = list(model.get_host_parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    report = governor.execute_rollback()
    assert report.rollback_occurred and report.reason == "Structural Collapse"
    assert model.seed_slot.state is None and model.seed_slot.seed is None
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert all(a is b for a, b in zip(parameters, model.get_host_parameters()))


def test_fossilized_seed_is_kept_and_restored():
    model = _model_with_seed(SeedStage.FOSSILIZED)
    governor = TolariaGovernor(model)
    seed_keys = _seed_keys(model)
    assert seed_keys <= set(governor.last_good_state)
    seed_param = next(model.seed_slot.seed.parameters())
    saved = seed_param.detach().clone()
    with torch.no_grad():
        seed_param.mul_(3.0)
    governor.execute_rollback()
    assert model.seed_slot.state.stage == SeedStage.FOSSILIZED
    assert torch.equal(seed_param, saved)


def test_blending_slot_forward_runs_the_fused_blend():
    model = _model_with_seed(SeedStage.BLENDING)
    model.seed_slot.set_alpha(0.25)
    x = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)
    out = model(x)
    assert out.shape == (4, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.get_seed_parameters())
