"""The packages together: the governor, the trainer and the fused ops on a real MorphogeneticModel."""

import contextlib

import pytest
import torch
import torch.nn as nn

from esper_fast.kasmina import CNNHost, MorphogeneticModel, SeedStage
from esper_fast.ops import reference_mode
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


def test_rollback_with_live_seed_keeps_the_snapshot_seed_state_like_the_original():
    # The original restores the slot's saved lifecycle state after culling the seed's module.
    model = _model_with_seed(SeedStage.BLENDING)
    governor = TolariaGovernor(model)
    governor.execute_rollback()
    assert model.seed_slot.seed is None and not model.has_active_seed
    assert model.seed_slot.state is not None and model.seed_slot.state.stage == SeedStage.BLENDING


@pytest.mark.parametrize("reference", [False, True])
def test_rollback_with_live_seed_culls_and_restores_host(reference):
    model = _model_with_seed(SeedStage.BLENDING)
    with reference_mode() if reference else contextlib.nullcontext():
        governor = TolariaGovernor(model, clear_live_seed_state=True)
    before = {
        k: v.clone() for k, v in model.state_dict().items() if k not in _seed_keys(model) and isinstance(v, torch.Tensor)
    }
    parameters = list(model.get_host_parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with reference_mode() if reference else contextlib.nullcontext():
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


# ------------------------------------------------------------------ trainer on real models

from esper_fast.kasmina import TransformerHost  # noqa: E402
from esper_fast.ops import reference_mode  # noqa: E402
from esper_fast.tolaria import (  # noqa: E402
    train_epoch_blended,
    validate_and_get_metrics,
    validate_with_attribution,
)


def _image_batches(n_batches=3, batch=16, classes=10):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n_batches)]


def _token_batches(n_batches=2, batch=4, block=16, vocab=64):
    g = torch.Generator().manual_seed(2)
    return [(torch.randint(0, vocab, (batch, block), generator=g), torch.randint(0, vocab, (batch, block), generator=g))
            for _ in range(n_batches)]


def test_validation_of_a_blending_cnn_matches_the_original_algorithm():
    model = _model_with_seed(SeedStage.BLENDING)
    model.seed_slot.set_alpha(0.6)
    batches = _image_batches()
    criterion = nn.CrossEntropyLoss()
    fast = validate_and_get_metrics(model, batches, batches, criterion, "cpu", compute_per_class=True)
    with reference_mode():
        ref = validate_and_get_metrics(model, batches, batches, criterion, "cpu", compute_per_class=True)
    assert fast[1] == ref[1] and fast[3] == ref[3] and fast[4] == ref[4]
    assert fast[0] == pytest.approx(ref[0], rel=1e-5) and fast[2] == pytest.approx(ref[2], rel=1e-5)
    assert fast[5] is None and ref[5] is None


def test_attribution_of_a_blending_cnn_matches_two_pass_original():
    model = _model_with_seed(SeedStage.BLENDING)
    model.seed_slot.set_alpha(0.8)
    batches = _image_batches()
    criterion = nn.CrossEntropyLoss()
    fast = validate_with_attribution(model, batches, criterion, "cpu")
    with reference_mode():
        ref = validate_with_attribution(model, batches, criterion, "cpu")
    assert model.seed_slot.alpha == pytest.approx(0.8)
    assert fast.real_accuracy == ref.real_accuracy and fast.baseline_accuracy == ref.baseline_accuracy
    assert fast.seed_contribution == pytest.approx(fast.real_accuracy - fast.baseline_accuracy)
    assert fast.real_loss == pytest.approx(ref.real_loss, rel=1e-5)
    assert fast.baseline_loss == pytest.approx(ref.baseline_loss, rel=1e-5)
    assert fast.real_loss != pytest.approx(fast.baseline_loss)  # the seed changes the output


def test_lm_validation_on_a_transformer_matches_the_original_algorithm():
    host = TransformerHost(vocab_size=64, n_embd=32, n_head=2, n_layer=2, block_size=16, dropout=0.0)
    model = MorphogeneticModel(host, task_config=None)
    batches = _token_batches()
    criterion = nn.CrossEntropyLoss()
    fast = validate_and_get_metrics(model, batches, batches, criterion, "cpu", task_type="lm")
    with reference_mode():
        ref = validate_and_get_metrics(model, batches, batches, criterion, "cpu", task_type="lm")
    assert fast[1] == ref[1] and fast[3] == ref[3]
    assert fast[0] == pytest.approx(ref[0], rel=1e-5)
    assert fast[5] == pytest.approx(ref[5], rel=1e-5)


def test_blended_training_steps_host_and_seed():
    model = _model_with_seed(SeedStage.BLENDING)
    model.seed_slot.set_alpha(0.5)
    host_opt = torch.optim.SGD(model.get_host_parameters(), lr=0.1)
    seed_opt = torch.optim.SGD(model.get_seed_parameters(), lr=0.1)
    host_before = [p.detach().clone() for p in model.get_host_parameters()]
    seed_before = [p.detach().clone() for p in model.get_seed_parameters()]
    train_epoch_blended(model, _image_batches(2), nn.CrossEntropyLoss(), host_opt, seed_opt, "cpu")
    assert any(not torch.equal(a, b) for a, b in zip(host_before, model.get_host_parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(seed_before, model.get_seed_parameters()))


def test_rollback_hands_over_the_snapshot_seed_state_itself_as_the_original():
    # The original loads the snapshot's objects as they are: the restored seed state is the
    # snapshot's, so what happens to it afterwards is what a second rollback restores.
    model = _model_with_seed(SeedStage.BLENDING)
    governor = TolariaGovernor(model)
    governor.execute_rollback()
    restored = model.seed_slot.state
    assert restored is governor.last_good_state["seed_slot._extra_state"]["seed_state"]
    restored.metrics.record_accuracy(50.0)
    governor.execute_rollback()
    assert model.seed_slot.state.metrics.epochs_total == 1
