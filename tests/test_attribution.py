"""Counterfactual validation in one shared pass, and validate_epoch.

The shared pass runs the host up to the slot once, the seed once and the rest of the host on
the real and the alpha-0 configuration together. Its results must be those of the two-pass
original (accuracies exact, losses within float tolerance), for every stage and both hosts,
and any model it cannot split exactly must get the two-forward path instead.
"""

import contextlib

import pytest
import torch
import torch.nn as nn

from esper_fast.kasmina import CNNHost, MorphogeneticModel, SeedStage, TransformerHost
from esper_fast.kasmina.host import splits_at_slots
from esper_fast.ops import reference_mode
from esper_fast.runtime import TaskConfig
from esper_fast.tolaria import (
    AttributionResult,
    EpochValidation,
    validate_and_get_metrics,
    validate_epoch,
    validate_with_attribution,
)
from esper_fast.tolaria.trainer import _grad_free, _shares_the_host_pass
from slot_helpers import Counter

LIFECYCLE = [SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.SHADOWING, SeedStage.PROBATIONARY, SeedStage.FOSSILIZED]


def _cnn_model(slot_id="block2_post"):
    return MorphogeneticModel(CNNHost(num_classes=10, base_channels=8), slot_id=slot_id, task_config=TaskConfig.for_cifar10())


def _lm_model(slot_id="layer_1_post_block"):
    host = TransformerHost(vocab_size=50, n_embd=16, n_head=2, n_layer=3, block_size=8, dropout=0.1)
    return MorphogeneticModel(host, slot_id=slot_id, task_config=TaskConfig.for_tinystories())


def _cnn_data(n=3, batch=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


def _lm_data(n=3, batch=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 50, (batch, 8), generator=g), torch.randint(0, 50, (batch, 8), generator=g)) for _ in range(n)]


def _grow(model, blueprint, stage, alpha):
    """Germinate and walk the seed to ``stage`` (None: no seed), then set alpha."""
    if stage is None:
        return model
    model.germinate_seed(blueprint, "seed")
    for target in LIFECYCLE:
        if model.seed_state.stage >= stage:
            break
        assert model.seed_slot.state.transition(target)
    model.seed_slot.set_alpha(alpha)
    return model


def _two_pass(model, data, task_type):
    """The original algorithm: two full passes, the second inside force_alpha(0)."""
    with reference_mode():
        return validate_with_attribution(model, data, nn.CrossEntropyLoss(), "cpu", task_type=task_type)


CASES = [
    ("cnn", None, 0.0),
    ("cnn", SeedStage.GERMINATED, 0.0),
    ("cnn", SeedStage.TRAINING, 0.0),
    ("cnn", SeedStage.TRAINING, 0.4),
    ("cnn", SeedStage.BLENDING, 0.3),
    ("cnn", SeedStage.SHADOWING, 1.0),
    ("cnn", SeedStage.FOSSILIZED, 1.0),
    ("lm", SeedStage.TRAINING, 0.0),
    ("lm", SeedStage.BLENDING, 0.6),
    ("lm", SeedStage.PROBATIONARY, 1.0),
]


@pytest.mark.parametrize("kind,stage,alpha", CASES)
def test_shared_pass_equals_the_two_pass_original(kind, stage, alpha):
    torch.manual_seed(0)
    if kind == "cnn":
        model, data, task_type, blueprint = _cnn_model(), _cnn_data(), "classification", "conv_light"
    else:
        model, data, task_type, blueprint = _lm_model(), _lm_data(), "lm", "attention"
    _grow(model, blueprint, stage, alpha)
    if model.seed_slot.seed is not None and blueprint == "attention":
        # A zero-initialised projection would make every configuration identical.
        nn.init.normal_(model.seed_slot.seed.proj.weight)
    assert model._splits()
    fast = validate_with_attribution(model, data, nn.CrossEntropyLoss(), "cpu", task_type=task_type)
    ref = _two_pass(model, data, task_type)
    assert fast.real_accuracy == ref.real_accuracy
    assert fast.baseline_accuracy == ref.baseline_accuracy
    assert fast.seed_contribution == ref.seed_contribution
    assert fast.real_loss == pytest.approx(ref.real_loss, rel=1e-5)
    assert fast.baseline_loss == pytest.approx(ref.baseline_loss, rel=1e-5)
    if stage in (SeedStage.BLENDING, SeedStage.SHADOWING):
        assert fast.real_loss != fast.baseline_loss  # the configurations really differ


@pytest.mark.parametrize("kind", ["cnn", "lm"])
def test_forward_alpha_configs_is_bit_for_bit_the_forward_under_force_alpha(kind):
    torch.manual_seed(1)
    if kind == "cnn":
        model, x, blueprint = _cnn_model("block3_post"), _cnn_data(1)[0][0], "depthwise"
    else:
        model, x, blueprint = _lm_model("layer_0_post_block"), _lm_data(1)[0][0], "lora"
    _grow(model, blueprint, SeedStage.BLENDING, 0.7).eval()
    if blueprint == "lora":
        nn.init.normal_(model.seed_slot.seed.up.weight)
    per_sample = torch.linspace(0, 1, x.shape[0])
    with torch.no_grad():
        outputs = model.forward_alpha_configs(x, [0.7, 0.0, 0.25, per_sample])
        for alpha, out in zip([0.7, 0.0, 0.25], outputs):
            with model.seed_slot.force_alpha(alpha):
                assert torch.equal(out, model(x)), alpha
        ref_rows = []
        for i in range(x.shape[0]):
            with model.seed_slot.force_alpha(float(per_sample[i])):
                ref_rows.append(model(x)[i])
        torch.testing.assert_close(outputs[3], torch.stack(ref_rows), rtol=1e-5, atol=1e-6)


def test_the_prefix_and_the_seed_run_once_per_batch_and_the_suffix_on_both_configurations():
    torch.manual_seed(0)
    model = _grow(_cnn_model(), "conv_light", SeedStage.BLENDING, 0.5)
    data = _cnn_data(n=4, batch=6)
    prefix, seed, suffix = Counter(model.host.blocks[0]), Counter(model.seed_slot.seed), Counter(model.host.blocks[2])
    validate_with_attribution(model, data, nn.CrossEntropyLoss(), "cpu")
    assert (prefix.calls, prefix.rows) == (4, 24)
    assert (seed.calls, seed.rows) == (4, 24)
    assert (suffix.calls, suffix.rows) == (4, 48)  # one call of 2B rows per batch


@pytest.mark.parametrize("stage", [None, SeedStage.GERMINATED, SeedStage.TRAINING])
def test_identical_configurations_run_one_forward_without_the_seed(stage):
    torch.manual_seed(0)
    model = _grow(_cnn_model(), "conv_light", stage, 0.0)
    data = _cnn_data(n=2, batch=6)
    suffix = Counter(model.host.blocks[2])
    seed = Counter(model.seed_slot.seed) if model.seed_slot.seed is not None else None
    result = validate_with_attribution(model, data, nn.CrossEntropyLoss(), "cpu")
    assert (suffix.calls, suffix.rows) == (2, 12)
    assert seed is None or seed.calls == 0  # the straight-through value is the host's
    assert result.seed_contribution == 0.0 and result.real_loss == result.baseline_loss


class PlusOneHost(CNNHost):
    """A subclass whose forward differs from the halves it inherits."""

    def forward(self, x):
        return super().forward(x) + 1.0


class NoSplitHost(nn.Module):
    """A custom host without the split methods."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 4)
        self.slots = nn.ModuleDict({"mid": nn.Identity()})
        self.head = nn.Linear(4, 3)

    @property
    def injection_points(self):
        return {"mid": 4}

    def register_slot(self, slot_id, slot):
        self.slots[slot_id] = slot

    def forward(self, x):
        return self.head(self.slots["mid"](self.body(x).unsqueeze(-1).unsqueeze(-1)).flatten(1))


def test_a_host_that_cannot_split_exactly_gets_the_two_forward_path():
    assert splits_at_slots(CNNHost()) and splits_at_slots(TransformerHost(vocab_size=10, n_embd=8, n_head=2, n_layer=1))
    assert not splits_at_slots(PlusOneHost()) and not splits_at_slots(NoSplitHost())
    hooked = CNNHost()
    hooked.register_forward_hook(lambda m, i, o: o * 2)
    assert not splits_at_slots(hooked)

    torch.manual_seed(0)
    model = MorphogeneticModel(PlusOneHost(num_classes=10, base_channels=8), task_config=TaskConfig.for_cifar10())
    _grow(model, "conv_light", SeedStage.BLENDING, 0.5)
    assert not model._splits()
    data = _cnn_data(n=2, batch=8)
    prefix = Counter(model.host.blocks[0])
    fast = validate_with_attribution(model, data, nn.CrossEntropyLoss(), "cpu")
    ref = _two_pass(model, data, "classification")
    assert prefix.calls == 2 * 2 + 2 * 2  # two forwards per batch on each path
    assert (fast.real_accuracy, fast.baseline_accuracy) == (ref.real_accuracy, ref.baseline_accuracy)
    assert fast.real_loss == pytest.approx(ref.real_loss, rel=1e-6)


def test_a_custom_host_without_split_methods_is_validated_with_two_forwards():
    torch.manual_seed(0)
    model = MorphogeneticModel(NoSplitHost(), task_config=TaskConfig.for_cifar10())
    model.germinate_seed("norm", "seed")
    model.seed_slot.state.transition(SeedStage.TRAINING)
    model.seed_slot.state.transition(SeedStage.BLENDING)
    model.seed_slot.set_alpha(0.5)
    data = [(torch.randn(5, 6), torch.randint(0, 3, (5,))) for _ in range(2)]
    body = Counter(model.host.body)
    result = validate_with_attribution(model, data, nn.CrossEntropyLoss(), "cpu")
    assert body.calls == 4
    ref = _two_pass(model, data, "classification")
    assert result.real_accuracy == ref.real_accuracy and result.baseline_accuracy == ref.baseline_accuracy


def test_a_hook_on_the_model_or_a_compiled_model_gets_the_two_forward_path():
    model = _cnn_model()
    assert model._splits()
    handle = model.register_forward_pre_hook(lambda m, args: None)
    assert not model._splits()
    handle.remove()
    model.compile(backend="eager")
    assert not model._splits()
    wrapped = torch.compile(_cnn_model(), backend="eager")
    assert not _shares_the_host_pass(wrapped)


def test_alpha_and_mode_are_restored_when_the_seed_fails():
    model = _grow(_cnn_model(), "conv_light", SeedStage.BLENDING, 0.5)
    model.train()

    def boom(module, inputs):
        raise RuntimeError("seed failed")

    model.seed_slot.seed.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="seed failed"):
        validate_with_attribution(model, _cnn_data(n=1), nn.CrossEntropyLoss(), "cpu")
    assert model.training and model.seed_slot.alpha == 0.5
    with pytest.raises(RuntimeError, match="seed failed"):
        validate_epoch(model, _cnn_data(n=1), _cnn_data(n=1), nn.CrossEntropyLoss(), "cpu")
    assert model.training and model.seed_slot.alpha == 0.5


# ---------------------------------------------------------------- validate_epoch


@pytest.mark.parametrize("reference", [False, True])
@pytest.mark.parametrize("kind", ["cnn", "lm"])
def test_validate_epoch_equals_the_two_functions(kind, reference):
    torch.manual_seed(2)
    if kind == "cnn":
        model, task_type = _grow(_cnn_model(), "attention", SeedStage.BLENDING, 0.5), "classification"
        train, test = _cnn_data(n=12, seed=1), _cnn_data(n=3, seed=2)
    else:
        model, task_type = _grow(_lm_model(), "lora", SeedStage.BLENDING, 0.5), "lm"
        nn.init.normal_(model.seed_slot.seed.up.weight)
        train, test = _lm_data(n=12, seed=1), _lm_data(n=3, seed=2)
    criterion = nn.CrossEntropyLoss()
    with reference_mode() if reference else contextlib.nullcontext():
        epoch = validate_epoch(model, train, test, criterion, "cpu", compute_per_class=True, task_type=task_type)
    metrics = validate_and_get_metrics(model, train, test, criterion, "cpu", compute_per_class=True, task_type=task_type)
    attribution = validate_with_attribution(model, test, criterion, "cpu", task_type=task_type)
    assert isinstance(epoch, EpochValidation) and isinstance(epoch.attribution, AttributionResult)
    values = (epoch.val_loss, epoch.val_accuracy, epoch.train_loss, epoch.train_accuracy, epoch.per_class_acc, epoch.perplexity)
    for got, want in zip(values, metrics):
        assert got == (pytest.approx(want, rel=1e-5) if isinstance(want, float) else want)
    assert epoch.attribution.real_accuracy == attribution.real_accuracy == epoch.val_accuracy
    assert epoch.attribution.baseline_accuracy == attribution.baseline_accuracy
    assert epoch.attribution.real_loss == pytest.approx(epoch.val_loss, rel=1e-6)


def test_validate_epoch_without_attribution_or_seed_has_none_and_skips_the_baseline():
    model = _cnn_model()
    data = _cnn_data(n=2)
    assert validate_epoch(model, data, data, nn.CrossEntropyLoss(), "cpu").attribution is None
    _grow(model, "conv_light", SeedStage.BLENDING, 0.5)
    suffix = Counter(model.host.blocks[2])
    result = validate_epoch(model, data, data, nn.CrossEntropyLoss(), "cpu", attribution=False)
    assert result.attribution is None
    assert suffix.rows == 2 * 12 + 2 * 12  # test and train passes, one configuration each
    assert validate_epoch(model, data, data, nn.CrossEntropyLoss(), "cpu").attribution is not None


def test_validate_epoch_reads_the_device_once(device_reads):
    model = _grow(_cnn_model(), "conv_light", SeedStage.BLENDING, 0.5)
    data = _cnn_data(n=2)
    validate_epoch(model, data, data, nn.CrossEntropyLoss(), "cpu", compute_per_class=True)
    assert device_reads == [3]  # real, train and baseline metrics in one read


def test_validate_epoch_rejects_empty_loaders_and_bad_labels():
    model = _grow(_cnn_model(), "conv_light", SeedStage.BLENDING, 0.5)
    data = _cnn_data(n=1)
    with pytest.raises(ValueError, match="testloader is empty"):
        validate_epoch(model, data, [], nn.CrossEntropyLoss(), "cpu")
    with pytest.raises(ValueError, match="trainloader is empty"):
        validate_epoch(model, [], data, nn.CrossEntropyLoss(), "cpu")
    bad = [(data[0][0], torch.full((12,), 10))]
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        validate_epoch(model, data, bad, nn.CrossEntropyLoss(), "cpu")


class CachingSeedHost(CNNHost):
    """A host from outside the package: it could keep tensors across calls."""


def test_inference_mode_only_where_no_module_can_keep_tensors():
    assert isinstance(_grad_free(_cnn_model()), torch.inference_mode)
    assert isinstance(_grad_free(_lm_model()), torch.inference_mode)
    assert isinstance(_grad_free(MorphogeneticModel(CachingSeedHost())), torch.no_grad)
    flex = _lm_model()
    try:
        flex.germinate_seed("flex_attention", "seed")
    except AssertionError:
        pytest.skip("FlexAttention is not available in this torch")
    assert isinstance(_grad_free(flex), torch.no_grad)


def test_training_after_validation_in_inference_mode_works():
    model = _grow(_cnn_model(), "conv_light", SeedStage.BLENDING, 0.5)
    data = _cnn_data(n=2)
    validate_epoch(model, data, data, nn.CrossEntropyLoss(), "cpu")
    model.train()
    loss = nn.CrossEntropyLoss()(model(data[0][0]), data[0][1])
    loss.backward()
    assert all(p.grad is not None for p in model.seed_slot.seed.parameters())


@pytest.mark.parametrize("shuffle", [False, True])
def test_attribution_draws_from_the_global_rng_as_the_two_pass_original(shuffle):
    model = _grow(_cnn_model(), "conv_light", SeedStage.BLENDING, 0.5)
    images, labels = torch.randn(20, 3, 32, 32), torch.randint(0, 10, (20,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=8, shuffle=shuffle)
    states = []
    for reference in (True, False):
        torch.manual_seed(5)
        with reference_mode() if reference else contextlib.nullcontext():
            validate_with_attribution(model, loader, nn.CrossEntropyLoss(), "cpu")
        states.append(torch.get_rng_state())
    assert torch.equal(states[0], states[1])
    torch.manual_seed(5)
    list(loader)
    assert not torch.equal(torch.get_rng_state(), states[1])  # one pass alone draws less


def test_lm_per_class_accuracy_is_every_class_at_zero_as_the_original():
    model = _lm_model()
    data = _lm_data(n=1)
    result = validate_and_get_metrics(model, data, data, nn.CrossEntropyLoss(), "cpu", compute_per_class=True,
                                      num_classes=4, task_type="lm")
    assert result[4] == {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0}
    assert validate_epoch(model, data, data, nn.CrossEntropyLoss(), "cpu", compute_per_class=True, num_classes=4,
                          task_type="lm").per_class_acc == result[4]
