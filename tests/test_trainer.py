"""The Tolaria trainer: training loops, fused validation vs the original algorithm, attribution."""

import contextlib
import math
import warnings

import pytest
import torch
import torch.nn as nn

from esper_fast.ops import reference_mode
from esper_fast.tolaria.trainer import (
    AttributionResult,
    train_epoch_blended,
    train_epoch_incubator_mode,
    train_epoch_normal,
    validate_and_get_metrics,
    validate_with_attribution,
)

CLASSES, FEATURES, VOCAB, SEQ = 10, 12, 37, 6


class ToySlot:
    """Duck-typed seed slot: an alpha and a force_alpha context manager that restores it."""

    def __init__(self, alpha=1.0):
        self.alpha = alpha

    @contextlib.contextmanager
    def force_alpha(self, value):
        previous = self.alpha
        self.alpha = value
        try:
            yield
        finally:
            self.alpha = previous


class SeededClassifier(nn.Module):
    """host(x) + alpha * seed(x); records the alpha every forward saw."""

    def __init__(self, alpha=1.0, fail_when_alpha_is=None):
        super().__init__()
        self.host = nn.Linear(FEATURES, CLASSES)
        self.seed = nn.Linear(FEATURES, CLASSES)
        self.seed_slot = ToySlot(alpha)
        self.seen_alphas = []
        self.fail_when_alpha_is = fail_when_alpha_is

    def forward(self, x):
        alpha = self.seed_slot.alpha
        self.seen_alphas.append(alpha)
        if alpha == self.fail_when_alpha_is:
            raise RuntimeError("forward failed")
        return self.host(x) + alpha * self.seed(x)


class TinyLM(nn.Module):
    def __init__(self, scale=1.0):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.head = nn.Linear(16, VOCAB)
        self.scale = scale
        self.seed_slot = ToySlot(1.0)

    def forward(self, tokens):
        return self.head(self.embed(tokens)) * self.scale


def classification_batches(n_batches=4, batch=16, generator_seed=0):
    g = torch.Generator().manual_seed(generator_seed)
    return [
        (torch.randn(batch, FEATURES, generator=g), torch.randint(0, CLASSES, (batch,), generator=g))
        for _ in range(n_batches)
    ]


def lm_batches(n_batches=3, batch=4):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randint(0, VOCAB, (batch, SEQ), generator=g), torch.randint(0, VOCAB, (batch, SEQ), generator=g))
        for _ in range(n_batches)
    ]


def _both_paths(fn):
    fast = fn()
    with reference_mode():
        ref = fn()
    return fast, ref


# ---------------------------------------------------------------- training loops (FIX-4)


def test_train_epoch_normal_updates_weights_and_leaves_train_mode():
    model = SeededClassifier()
    model.eval()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_epoch_normal(model, classification_batches(), nn.CrossEntropyLoss(), optimizer, "cpu")
    assert model.training
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_training_reduces_the_loss():
    model = SeededClassifier()
    data = classification_batches(n_batches=8)
    criterion = nn.CrossEntropyLoss()
    start = validate_and_get_metrics(model, data, data, criterion, "cpu")[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        train_epoch_normal(model, data, criterion, optimizer, "cpu")
    assert validate_and_get_metrics(model, data, data, criterion, "cpu")[0] < start


class CountingSGD(torch.optim.SGD):
    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.steps = 0
        self.zeroed = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)

    def zero_grad(self, set_to_none=True):
        assert set_to_none
        self.zeroed += 1
        return super().zero_grad(set_to_none=set_to_none)


def test_train_epoch_incubator_mode_steps_both_optimizers():
    model = SeededClassifier()
    host_opt = CountingSGD(model.host.parameters(), lr=0.1)
    seed_opt = CountingSGD(model.seed.parameters(), lr=0.1)
    host_before = model.host.weight.detach().clone()
    seed_before = model.seed.weight.detach().clone()
    data = classification_batches(n_batches=3)
    train_epoch_incubator_mode(model, data, nn.CrossEntropyLoss(), host_opt, seed_opt, "cpu")
    assert (host_opt.steps, seed_opt.steps, host_opt.zeroed, seed_opt.zeroed) == (3, 3, 3, 3)
    assert not torch.equal(host_before, model.host.weight)
    assert not torch.equal(seed_before, model.seed.weight)


def test_train_epoch_blended_with_and_without_seed_optimizer():
    model = SeededClassifier()
    seed_before = model.seed.weight.detach().clone()
    host_opt = CountingSGD(model.host.parameters(), lr=0.1)
    train_epoch_blended(model, classification_batches(n_batches=2), nn.CrossEntropyLoss(), host_opt, None, "cpu")
    assert host_opt.steps == 2
    assert torch.equal(seed_before, model.seed.weight)  # nothing steps the seed
    seed_opt = CountingSGD(model.seed.parameters(), lr=0.1)
    train_epoch_blended(model, classification_batches(n_batches=2), nn.CrossEntropyLoss(), host_opt, seed_opt, "cpu")
    assert (host_opt.steps, seed_opt.steps) == (4, 2)
    assert not torch.equal(seed_before, model.seed.weight)


def test_train_epoch_lm_flattens_outputs():
    model = TinyLM()
    before = model.head.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_epoch_normal(model, lm_batches(), nn.CrossEntropyLoss(), optimizer, "cpu", task_type="lm")
    assert not torch.equal(before, model.head.weight)


# ---------------------------------------------------------------- validate_and_get_metrics


CRITERIA = {
    "default": lambda: nn.CrossEntropyLoss(),
    "label_smoothing": lambda: nn.CrossEntropyLoss(label_smoothing=0.1),
    "class_weights": lambda: nn.CrossEntropyLoss(weight=torch.linspace(0.5, 2.0, CLASSES)),
}


@pytest.mark.parametrize("per_class", [False, True], ids=["total", "per_class"])
@pytest.mark.parametrize("criterion_name", list(CRITERIA))
def test_classification_fast_equals_reference(criterion_name, per_class):
    model = SeededClassifier()
    train, test = classification_batches(n_batches=12, generator_seed=2), classification_batches(n_batches=5)
    criterion = CRITERIA[criterion_name]()
    fast, ref = _both_paths(
        lambda: validate_and_get_metrics(
            model, train, test, criterion, "cpu", compute_per_class=per_class, num_classes=CLASSES
        )
    )
    val_loss, val_acc, train_loss, train_acc, per_class_acc, perplexity = fast
    assert val_loss == pytest.approx(ref[0], rel=1e-5)
    assert train_loss == pytest.approx(ref[2], rel=1e-5)
    assert (val_acc, train_acc) == (ref[1], ref[3])  # exact: the same integer counts
    assert per_class_acc == ref[4]
    assert perplexity is None and ref[5] is None
    assert all(type(v) is float for v in fast[:4])
    # against a direct computation of the original's definitions
    criterion_values = [criterion(model(x), y).item() for x, y in test]
    assert val_loss == pytest.approx(sum(criterion_values) / len(test), rel=1e-5)
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in test)
    assert val_acc == 100.0 * correct / sum(len(y) for _, y in test)
    if per_class:
        assert set(per_class_acc) == set(range(CLASSES))
        assert all(type(v) is float for v in per_class_acc.values())


@pytest.mark.parametrize("criterion_name", ["default", "label_smoothing"])
def test_lm_fast_equals_reference_and_perplexity(criterion_name):
    model = TinyLM()
    data = lm_batches()
    criterion = CRITERIA[criterion_name]()
    fast, ref = _both_paths(lambda: validate_and_get_metrics(model, data, data, criterion, "cpu", task_type="lm"))
    assert fast[0] == pytest.approx(ref[0], rel=1e-5)
    assert (fast[1], fast[3]) == (ref[1], ref[3])
    assert fast[4] is None
    assert fast[5] == pytest.approx(math.exp(fast[0]), rel=1e-12)
    assert fast[5] == pytest.approx(ref[5], rel=1e-5)
    tokens = sum(y.numel() for _, y in data)
    correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in data)
    assert fast[1] == 100.0 * correct / tokens


def test_lm_perplexity_is_inf_from_loss_20():
    model = TinyLM(scale=500.0)  # confidently wrong: loss in the hundreds
    data = lm_batches()
    val_loss, *_, perplexity = validate_and_get_metrics(model, data, data, nn.CrossEntropyLoss(), "cpu", task_type="lm")
    assert val_loss >= 20 and perplexity == math.inf


def test_lm_ignore_index_tokens():
    model = TinyLM()
    data = lm_batches()
    data[0][1][:, -2:] = -100  # padding
    criterion = nn.CrossEntropyLoss()
    fast, ref = _both_paths(lambda: validate_and_get_metrics(model, data, data, criterion, "cpu", task_type="lm"))
    assert fast[0] == pytest.approx(ref[0], rel=1e-5)
    assert fast[1] == ref[1]


def test_train_metrics_use_only_the_first_ten_batches():
    pulled = []

    def trainloader():
        for i, batch in enumerate(classification_batches(n_batches=15)):
            pulled.append(i)
            yield batch

    model = SeededClassifier()
    first_ten = classification_batches(n_batches=15)[:10]
    fast = validate_and_get_metrics(model, trainloader(), first_ten, nn.CrossEntropyLoss(), "cpu")
    assert pulled == list(range(10))
    assert fast[2] == pytest.approx(fast[0]) and fast[3] == fast[1]


def test_one_read_per_validation_call(device_reads):
    model = SeededClassifier()
    data = classification_batches()
    validate_and_get_metrics(model, data, data, nn.CrossEntropyLoss(), "cpu", compute_per_class=True)
    validate_with_attribution(model, data, nn.CrossEntropyLoss(), "cpu")
    assert device_reads == [2, 2]


@pytest.mark.parametrize("start_training", [True, False])
def test_validation_restores_model_mode(start_training):
    model = SeededClassifier()
    model.train(start_training)
    data = classification_batches()
    validate_and_get_metrics(model, data, data, nn.CrossEntropyLoss(), "cpu")
    assert model.training is start_training
    validate_with_attribution(model, data, nn.CrossEntropyLoss(), "cpu")
    assert model.training is start_training
    with reference_mode():
        validate_and_get_metrics(model, data, data, nn.CrossEntropyLoss(), "cpu")
    assert model.training is start_training


def test_validation_runs_in_eval_mode_without_grad():
    seen = []

    class Probe(SeededClassifier):
        def forward(self, x):
            seen.append((self.training, torch.is_grad_enabled()))
            return super().forward(x)

    model = Probe()
    data = classification_batches(n_batches=2)
    validate_and_get_metrics(model, data, data, nn.CrossEntropyLoss(), "cpu")
    assert seen and all(s == (False, False) for s in seen)


def test_bad_label_raises_clear_error_and_restores_mode():
    model = SeededClassifier()
    model.train()
    data = classification_batches()
    data[2][1][3] = CLASSES + 5
    with pytest.raises(ValueError, match=rf"outside \[0, {CLASSES}\).*{CLASSES + 5}"):
        validate_and_get_metrics(model, data[:1], data, nn.CrossEntropyLoss(), "cpu")
    assert model.training


# ---------------------------------------------------------------- empty loaders (FIX-2)


@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
def test_empty_loaders_raise_naming_the_loader(reference):
    model = SeededClassifier()
    model.train()
    data = classification_batches()
    with reference_mode(reference):
        with pytest.raises(ValueError, match="testloader"):
            validate_and_get_metrics(model, data, [], nn.CrossEntropyLoss(), "cpu")
        with pytest.raises(ValueError, match="trainloader"):
            validate_and_get_metrics(model, [], data, nn.CrossEntropyLoss(), "cpu")
        empty = validate_with_attribution(model, [], nn.CrossEntropyLoss(), "cpu")
        assert empty == AttributionResult(0.0, 0.0, 0.0, 0.0, 0.0)
    assert model.training


# ---------------------------------------------------------------- attribution (FIX-1)


@pytest.mark.parametrize("criterion_name", list(CRITERIA))
def test_attribution_measures_seed_contribution(criterion_name):
    model = SeededClassifier(alpha=0.7)
    data = classification_batches(n_batches=5)
    criterion = CRITERIA[criterion_name]()
    result = validate_with_attribution(model, data, criterion, "cpu")
    assert model.seed_slot.alpha == 0.7
    # One pass: each batch runs the real then the alpha-0 forward.
    assert model.seen_alphas == [0.7, 0.0] * len(data)

    def direct(alpha):
        with torch.no_grad():
            outs = [model.host(x) + alpha * model.seed(x) for x, _ in data]
        correct = sum(int((o.argmax(1) == y).sum()) for o, (_, y) in zip(outs, data))
        loss = sum(criterion(o, y).item() for o, (_, y) in zip(outs, data)) / len(data)
        return 100.0 * correct / sum(len(y) for _, y in data), loss

    real_acc, real_loss = direct(0.7)
    base_acc, base_loss = direct(0.0)
    assert (result.real_accuracy, result.baseline_accuracy) == (real_acc, base_acc)
    assert result.seed_contribution == real_acc - base_acc
    assert result.real_loss == pytest.approx(real_loss, rel=1e-5)
    assert result.baseline_loss == pytest.approx(base_loss, rel=1e-5)
    assert result.real_loss != pytest.approx(result.baseline_loss)

    with reference_mode():
        model.seen_alphas.clear()
        ref = validate_with_attribution(model, data, criterion, "cpu")
    assert model.seen_alphas == [0.7] * len(data) + [0.0] * len(data)  # the original's two passes
    assert (ref.real_accuracy, ref.baseline_accuracy, ref.seed_contribution) == (
        result.real_accuracy,
        result.baseline_accuracy,
        result.seed_contribution,
    )
    assert ref.real_loss == pytest.approx(result.real_loss, rel=1e-5)
    assert ref.baseline_loss == pytest.approx(result.baseline_loss, rel=1e-5)


def test_attribution_with_a_helpful_seed():
    """A seed that knows the answer: real accuracy 100%, contribution = 100 - host accuracy."""
    model = SeededClassifier(alpha=1.0)
    data = classification_batches(n_batches=3)
    with torch.no_grad():
        model.seed.weight.zero_()
        model.seed.bias.zero_()
    oracle = {id(x): y for x, y in data}

    class Oracle(nn.Module):
        def forward(self, x):
            return nn.functional.one_hot(oracle[id(x)], CLASSES).float() * 1000.0

    model.seed = Oracle()
    result = validate_with_attribution(model, data, nn.CrossEntropyLoss(), "cpu")
    assert result.real_accuracy == 100.0
    assert result.seed_contribution == 100.0 - result.baseline_accuracy > 0
    assert result.real_loss < result.baseline_loss


def test_attribution_without_seed_contribution_is_zero():
    model = SeededClassifier(alpha=0.0)
    result = validate_with_attribution(model, classification_batches(), nn.CrossEntropyLoss(), "cpu")
    assert result.seed_contribution == 0.0
    assert result.real_accuracy == result.baseline_accuracy
    assert result.real_loss == result.baseline_loss
    assert model.seed_slot.alpha == 0.0


@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
@pytest.mark.parametrize("start_training", [True, False])
def test_attribution_restores_alpha_and_mode_on_error(reference, start_training):
    model = SeededClassifier(alpha=0.5, fail_when_alpha_is=0.0)
    model.train(start_training)
    with reference_mode(reference), pytest.raises(RuntimeError, match="forward failed"):
        validate_with_attribution(model, classification_batches(), nn.CrossEntropyLoss(), "cpu")
    assert model.seed_slot.alpha == 0.5
    assert model.training is start_training
    assert 0.0 in model.seen_alphas  # the error happened during the forced-alpha forward


def test_attribution_lm():
    model = TinyLM()
    data = lm_batches()
    criterion = nn.CrossEntropyLoss()
    fast, ref = _both_paths(lambda: validate_with_attribution(model, data, criterion, "cpu", task_type="lm"))
    assert fast.real_accuracy == ref.real_accuracy
    assert fast.real_loss == pytest.approx(ref.real_loss, rel=1e-5)
    assert fast.seed_contribution == 0.0  # TinyLM ignores alpha


@pytest.mark.cuda
def test_cuda_validation_reads_the_device_once():
    model = SeededClassifier(alpha=0.5).cuda()
    data = [(x.cuda(), y.cuda()) for x, y in classification_batches(n_batches=6)]
    criterion = nn.CrossEntropyLoss()
    fast, ref = _both_paths(
        lambda: validate_and_get_metrics(model, data, data, criterion, "cuda", compute_per_class=True)
    )
    assert fast[0] == pytest.approx(ref[0], rel=1e-5)
    assert fast[1] == ref[1] and fast[4] == ref[4]
    for run in (
        lambda: validate_and_get_metrics(model, data, data, criterion, "cuda", compute_per_class=True),
        lambda: validate_with_attribution(model, data, nn.CrossEntropyLoss(label_smoothing=0.1), "cuda"),
    ):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        assert len(syncs) == 1, [str(w.message) for w in syncs]
