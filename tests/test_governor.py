"""TolariaGovernor: vital signs, snapshot and in-place rollback (weights, buffers, optimizers, seeds)."""

import gc
import math
import os
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import esper_fast.ops.snapshot as snapshot_module
from esper_fast.kasmina.stages import SeedStage
from esper_fast.ops import reference_mode
from esper_fast.tolaria import GovernorReport, TolariaGovernor


def _small_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def _scramble(model):
    """Arbitrary changes to every parameter and buffer (incl. BatchNorm stats via a forward)."""
    model.train()
    model(torch.randn(8, 3, 8, 8))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-3.0).add_(1.0)


def _fill_history(gov, values):
    for v in values:
        assert gov.check_vital_signs(v) is False


class ToySlot(nn.Module):
    """Duck-typed seed slot: ``state.stage``, a ``seed`` module, ``cull(reason)`` drops the seed."""

    def __init__(self):
        super().__init__()
        self.seed = None
        self.state = None
        self.culled = []

    def germinate(self, stage=SeedStage.TRAINING):
        self.seed = nn.Linear(4, 4)
        self.state = SimpleNamespace(stage=stage)

    def cull(self, reason):
        self.culled.append(reason)
        self.seed = None
        self.state = None


class ToyMorphogenetic(nn.Module):
    def __init__(self):
        super().__init__()
        self.host = nn.Linear(4, 4)
        self.seed_slot = ToySlot()


# ------------------------------------------------------------------------------ construction


def test_init_takes_a_snapshot_of_every_key():
    model = _small_model()
    gov = TolariaGovernor(model)
    state = gov.last_good_state
    assert state is not None and list(state) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert state[key].device.type == "cpu"
        assert not state[key].requires_grad
        assert torch.equal(state[key], value)
        assert state[key].data_ptr() != value.data_ptr()
    assert gov.random_guess_loss == pytest.approx(math.log(10))
    assert gov.loss_history.maxlen == 20 and gov.consecutive_panics == 0


def test_defaults_match_the_contract():
    gov = TolariaGovernor(nn.Linear(2, 2))
    assert (gov.sensitivity, gov.multiplier, gov.absolute_threshold, gov.death_penalty) == (6.0, 3.0, 10.0, 10.0)
    assert gov.min_panics_before_rollback == 2


def test_snapshot_is_independent_of_later_training():
    model = _small_model()
    gov = TolariaGovernor(model)
    before = {k: v.clone() for k, v in gov.last_good_state.items()}
    _scramble(model)
    for key, value in gov.last_good_state.items():
        assert torch.equal(value, before[key])


# ------------------------------------------------------------------------------ vital signs


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_panics_immediately(bad):
    gov = TolariaGovernor(nn.Linear(2, 2), min_panics_before_rollback=3)
    assert gov.check_vital_signs(bad) is True
    assert gov.consecutive_panics == 3
    assert len(gov.loss_history) == 0


def test_zero_dim_tensor_loss_is_accepted():
    gov = TolariaGovernor(nn.Linear(2, 2))
    assert gov.check_vital_signs(torch.tensor(1.5)) is False
    assert gov.loss_history[-1] == 1.5
    assert gov.check_vital_signs(torch.tensor(float("nan"))) is True


def test_fewer_than_ten_samples_only_append():
    gov = TolariaGovernor(nn.Linear(2, 2))
    for i in range(9):
        assert gov.check_vital_signs(1000.0 * (i + 1)) is False
    assert len(gov.loss_history) == 9 and gov.consecutive_panics == 0


def test_lobotomy_panics_immediately():
    gov = TolariaGovernor(nn.Linear(2, 2))
    _fill_history(gov, [0.5] * 10)
    assert gov.check_vital_signs(math.log(10) + 0.1) is True
    assert gov.consecutive_panics == gov.min_panics_before_rollback


def test_lobotomy_needs_a_healthy_history_and_a_close_loss():
    gov = TolariaGovernor(nn.Linear(2, 2))
    _fill_history(gov, [2.0] * 10)  # mean 2.0 >= 0.6 * ln(10): never healthy
    assert gov.check_vital_signs(math.log(10)) is False
    gov = TolariaGovernor(nn.Linear(2, 2))
    _fill_history(gov, [0.5] * 10)
    assert gov.check_vital_signs(math.log(10) + 0.2) is False  # outside 6.5% of ln(10)


def test_lobotomy_uses_the_task_random_guess_loss():
    rgl = math.log(50257)
    gov = TolariaGovernor(nn.Linear(2, 2), random_guess_loss=rgl)
    _fill_history(gov, [3.0] * 10)
    assert gov.check_vital_signs(rgl - 0.6) is True


def test_anomaly_needs_consecutive_panics_and_is_not_appended():
    gov = TolariaGovernor(nn.Linear(2, 2))
    history = [1.0 + 0.01 * i for i in range(10)]
    _fill_history(gov, history)
    assert gov.check_vital_signs(100.0) is False
    assert gov.consecutive_panics == 1 and len(gov.loss_history) == 10
    assert gov.check_vital_signs(100.0) is True
    assert gov.consecutive_panics == 2 and list(gov.loss_history) == history


def test_normal_loss_resets_the_panic_counter():
    gov = TolariaGovernor(nn.Linear(2, 2))
    _fill_history(gov, [1.0 + 0.01 * i for i in range(10)])
    assert gov.check_vital_signs(100.0) is False
    assert gov.check_vital_signs(1.05) is False
    assert gov.consecutive_panics == 0 and gov.loss_history[-1] == 1.05
    assert gov.check_vital_signs(100.0) is False  # the count starts over


def test_anomaly_needs_all_three_thresholds():
    gov = TolariaGovernor(nn.Linear(2, 2), min_panics_before_rollback=1)
    _fill_history(gov, [1.0 + 0.01 * i for i in range(10)])
    assert gov.check_vital_signs(9.0) is False  # above statistics and multiplier, below absolute
    gov = TolariaGovernor(nn.Linear(2, 2), min_panics_before_rollback=1)
    _fill_history(gov, [5.0] * 10)
    assert gov.check_vital_signs(12.0) is False  # above absolute and statistics, below 3x mean
    gov = TolariaGovernor(nn.Linear(2, 2), min_panics_before_rollback=1)
    _fill_history(gov, [5.0, 5.0, 5.0, 5.0, 5.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert gov.check_vital_signs(12.0) is False  # above absolute and 3x mean, below 6 sigma
    assert gov.check_vital_signs(40.0) is True


def _model_of_rules(params, history, consecutive, loss):
    """The API.md rules as a pure function: (panic, history, consecutive) after one loss."""
    sensitivity, multiplier, absolute, min_panics, rgl, window = params
    if loss != loss or loss in (float("inf"), float("-inf")):
        return True, history, min_panics
    n = len(history)
    if n >= 10:
        mean = sum(history) / n
        if mean < 0.6 * rgl and abs(loss - rgl) < 0.065 * rgl:
            return True, history, min_panics
    if n < 10:
        return False, (history + [loss])[-window:], consecutive
    mean = sum(history) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in history) / n)
    if loss > absolute and loss > mean + sensitivity * std and loss > mean * multiplier:
        return consecutive + 1 >= min_panics, history, consecutive + 1
    return False, (history + [loss])[-window:], 0


_losses = st.one_of(
    st.floats(min_value=0.0, max_value=200.0, allow_nan=False),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), math.log(10), 1.0, 50.0]),
)


@settings(max_examples=150, deadline=None)
@given(
    sensitivity=st.sampled_from([0.0, 1.0, 6.0]),
    multiplier=st.sampled_from([1.0, 3.0]),
    absolute=st.sampled_from([0.0, 10.0]),
    min_panics=st.integers(1, 3),
    rgl=st.sampled_from([math.log(10), 5.0]),
    window=st.integers(10, 25),
    losses=st.lists(_losses, min_size=11, max_size=40),
)
def test_vital_signs_match_a_model_of_the_rules(sensitivity, multiplier, absolute, min_panics, rgl, window, losses):
    gov = TolariaGovernor(
        nn.Identity(),
        sensitivity=sensitivity,
        multiplier=multiplier,
        absolute_threshold=absolute,
        history_window=window,
        min_panics_before_rollback=min_panics,
        random_guess_loss=rgl,
    )
    params = (sensitivity, multiplier, absolute, min_panics, rgl, window)
    history, consecutive = [], 0
    for loss in losses:
        expected, history, consecutive = _model_of_rules(params, history, consecutive, loss)
        assert gov.check_vital_signs(loss) is expected
        assert list(gov.loss_history) == history
        assert gov.consecutive_panics == consecutive


@settings(max_examples=100, deadline=None)
@given(
    history=st.lists(st.floats(min_value=0.01, max_value=50.0), min_size=10, max_size=20),
    loss=st.floats(min_value=0.0, max_value=1000.0),
    extra=st.floats(min_value=0.0, max_value=1000.0),
)
def test_panic_is_monotonic_in_the_loss(history, loss, extra):
    def panics(value):
        gov = TolariaGovernor(nn.Identity(), min_panics_before_rollback=1, random_guess_loss=1e-3)
        _fill_history(gov, history[:10])
        for h in history[10:]:
            gov.check_vital_signs(h)
        gov.consecutive_panics = 0
        return gov.check_vital_signs(value)

    if panics(loss):
        assert panics(loss + extra)


# ------------------------------------------------------------------------------ rollback


@pytest.mark.parametrize("snapshot_mode", ["host", "device"])
def test_rollback_restores_bit_exact_and_keeps_parameter_identity(snapshot_mode):
    model = _small_model()
    gov = TolariaGovernor(model, snapshot_mode=snapshot_mode)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    bn = model[1]
    _scramble(model)
    assert not torch.equal(bn.running_mean, expected["1.running_mean"])
    gov.check_vital_signs(float("nan"))
    report = gov.execute_rollback()
    assert all(a is b for a, b in zip(params, model.parameters()))
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert bn.num_batches_tracked.item() == expected["1.num_batches_tracked"].item()
    assert report.rollback_occurred is True and report.consecutive_panics == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rollback_low_precision_and_mixed_models(dtype):
    model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))
    model[1].to(dtype)
    gov = TolariaGovernor(model)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    gov.execute_rollback()
    for key, value in model.state_dict().items():
        assert value.dtype == expected[key].dtype and torch.equal(value, expected[key]), key


def test_rollback_works_for_a_model_without_parameters():
    model = nn.Sequential(nn.ReLU(), nn.Flatten())
    gov = TolariaGovernor(model)
    assert gov.last_good_state == {}
    report = gov.execute_rollback()
    assert report.rollback_occurred


def test_rollback_of_buffers_only_model():
    model = nn.BatchNorm1d(3, affine=False)
    gov = TolariaGovernor(model)
    model(torch.randn(10, 3))
    gov.execute_rollback()
    assert torch.equal(model.running_mean, torch.zeros(3)) and model.num_batches_tracked.item() == 0


def test_report_fields():
    gov = TolariaGovernor(nn.Linear(2, 2))
    history = [1.0 + 0.1 * i for i in range(10)]
    _fill_history(gov, history)
    gov.check_vital_signs(100.0)
    gov.check_vital_signs(120.0)
    report = gov.execute_rollback()
    mean = sum(history) / 10
    std = math.sqrt(sum((x - mean) ** 2 for x in history) / 10)
    assert isinstance(report, GovernorReport)
    assert report.reason == "Structural Collapse"
    assert report.loss_at_panic == 120.0
    assert report.loss_threshold == pytest.approx(mean + 6.0 * std)
    assert report.consecutive_panics == 0 and gov.consecutive_panics == 0
    assert report.rollback_occurred is True


def test_report_without_panic_has_nan_loss_and_zero_threshold():
    report = TolariaGovernor(nn.Linear(2, 2)).execute_rollback()
    assert math.isnan(report.loss_at_panic) and report.loss_threshold == 0.0


def test_rollback_without_snapshot_raises():
    gov = TolariaGovernor(nn.Linear(2, 2))
    gov.last_good_state = None
    with pytest.raises(RuntimeError, match="Governor panic before first snapshot!"):
        gov.execute_rollback()


def test_punishment_and_reset():
    model = nn.Linear(3, 3)
    gov = TolariaGovernor(model, death_penalty=7.5)
    assert gov.get_punishment_reward() == -7.5
    _fill_history(gov, [1.0] * 10)
    gov.check_vital_signs(float("inf"))
    with torch.no_grad():
        model.weight.fill_(2.0)
    gov.reset()
    assert len(gov.loss_history) == 0 and gov.consecutive_panics == 0
    assert torch.equal(gov.last_good_state["weight"], torch.full((3, 3), 2.0))
    assert math.isnan(gov.execute_rollback().loss_at_panic)


def test_exception_during_snapshot_keeps_the_previous_one(monkeypatch):
    model = _small_model()
    gov = TolariaGovernor(model)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    _scramble(model)

    def failing_pack(values, buffer, offsets):
        snapshot_module.torch.ops.esper_fast.snapshot_pack.default(values[:2], buffer, list(offsets[:2]))
        raise KeyboardInterrupt

    monkeypatch.setattr(snapshot_module, "snapshot_pack", failing_pack)
    with pytest.raises(KeyboardInterrupt):
        gov.snapshot()
    monkeypatch.undo()
    gov.execute_rollback()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_non_blocking_snapshot_on_cpu_commits_at_once():
    model = nn.Linear(3, 3)
    gov = TolariaGovernor(model)
    with torch.no_grad():
        model.weight.fill_(4.0)
    gov.snapshot(non_blocking=True)
    assert torch.equal(gov.last_good_state["weight"], torch.full((3, 3), 4.0))


def test_thousand_snapshot_rollback_cycles_keep_memory_flat():
    model = _small_model()
    gov = TolariaGovernor(model)
    for _ in range(20):
        gov.snapshot()
        gov.execute_rollback()
    gc.collect()
    with open(f"/proc/{os.getpid()}/statm") as f:
        before = int(f.read().split()[1])
    for _ in range(1000):
        gov.snapshot()
        gov.execute_rollback()
    gc.collect()
    with open(f"/proc/{os.getpid()}/statm") as f:
        after = int(f.read().split()[1])
    assert (after - before) * os.sysconf("SC_PAGE_SIZE") < 4 * 1024 * 1024
    assert gov._model_snapshot.allocations == 2


# ------------------------------------------------------------------------------ optimizers


def _train_steps(model, optimizer, steps=3):
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(4, 3, 8, 8)).square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize(
    "make_optimizer",
    [lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), lambda ps: torch.optim.Adam(ps, lr=1e-2)],
    ids=["sgd_momentum", "adam"],
)
def test_optimizer_state_is_restored_with_the_weights(make_optimizer):
    model = _small_model()
    optimizer = make_optimizer(model.parameters())
    _train_steps(model, optimizer)
    gov = TolariaGovernor(model, optimizers=optimizer)
    expected = {p: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    live = {p: dict(s) for p, s in optimizer.state.items()}
    _train_steps(model, optimizer, steps=2)
    gov.execute_rollback()
    assert set(optimizer.state) == set(expected)
    for p, state in expected.items():
        for name, value in state.items():
            restored = optimizer.state[p][name]
            assert torch.equal(restored, value), name
            assert restored is live[p][name]  # restored in place
    _train_steps(model, optimizer)  # still a working optimizer


def test_optimizer_state_absent_at_snapshot_is_absent_after_rollback():
    model = _small_model()
    optimizer = torch.optim.Adam(model.parameters())
    gov = TolariaGovernor(model, optimizers=[optimizer])
    _train_steps(model, optimizer)
    assert len(optimizer.state) > 0
    gov.execute_rollback()
    assert len(optimizer.state) == 0
    _train_steps(model, optimizer)


def test_optimizer_reset_policy_and_untracked_optimizer():
    model = _small_model()
    tracked = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train_steps(model, tracked)
    gov = TolariaGovernor(model, optimizers=tracked, optimizer_rollback="reset")
    gov.execute_rollback()
    assert len(tracked.state) == 0 and tracked.param_groups[0]["lr"] == 0.1

    other = torch.optim.Adam(model.parameters())
    _train_steps(model, other)
    gov = TolariaGovernor(model)
    gov.execute_rollback()
    assert len(other.state) > 0  # default: optimizers untouched, as in the original
    gov.execute_rollback(optimizer=other)
    assert len(other.state) == 0


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="snapshot_mode"):
        TolariaGovernor(nn.Linear(2, 2), snapshot_mode="disk")
    with pytest.raises(ValueError, match="optimizer_rollback"):
        TolariaGovernor(nn.Linear(2, 2), optimizer_rollback="zero")


# ------------------------------------------------------------------------------ seeds


def test_live_seed_is_left_out_and_rollback_after_cull_succeeds():
    model = ToyMorphogenetic()
    model.seed_slot.germinate(SeedStage.TRAINING)
    gov = TolariaGovernor(model)
    assert set(gov.last_good_state) == {"host.weight", "host.bias"}
    expected = model.host.weight.detach().clone()
    with torch.no_grad():
        model.host.weight.zero_()
    gov.execute_rollback()
    assert model.seed_slot.culled == ["governor_rollback"]
    assert model.seed_slot.seed is None
    assert torch.equal(model.host.weight, expected)


def test_fossilized_seed_is_kept_and_restored():
    model = ToyMorphogenetic()
    model.seed_slot.germinate(SeedStage.FOSSILIZED)
    gov = TolariaGovernor(model)
    assert "seed_slot.seed.weight" in gov.last_good_state
    expected = model.seed_slot.seed.weight.detach().clone()
    with torch.no_grad():
        model.seed_slot.seed.weight.add_(1)
    gov.execute_rollback()
    assert model.seed_slot.culled == []
    assert torch.equal(model.seed_slot.seed.weight, expected)


def test_snapshot_without_seed_then_rollback_with_live_seed():
    model = ToyMorphogenetic()
    gov = TolariaGovernor(model)
    model.seed_slot.germinate(SeedStage.BLENDING)
    gov.execute_rollback()
    assert model.seed_slot.culled == ["governor_rollback"]


# ------------------------------------------------------------------------------ reference path


def test_reference_mode_matches_the_fast_path():
    torch.manual_seed(1)
    fast_model = _small_model()
    ref_model = _small_model()
    ref_model.load_state_dict(fast_model.state_dict())
    fast = TolariaGovernor(fast_model)
    with reference_mode():
        ref = TolariaGovernor(ref_model)
        assert isinstance(ref.last_good_state, dict)
    torch.manual_seed(2)
    _scramble(fast_model)
    torch.manual_seed(2)
    _scramble(ref_model)
    fast.execute_rollback()
    with reference_mode():
        ref.execute_rollback()
    for (key, a), b in zip(fast_model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(a, b), key


# ------------------------------------------------------------------------------ CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("snapshot_mode", ["host", "device"])
def test_cuda_rollback(snapshot_mode):
    model = _small_model().cuda()
    optimizer = torch.optim.Adam(model.parameters())
    gov = TolariaGovernor(model, optimizers=optimizer, snapshot_mode=snapshot_mode)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(4, 3, 8, 8, device="cuda")).square().mean().backward()
        optimizer.step()
    gov.snapshot(non_blocking=True)
    gov._model_snapshot.wait()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_opt = {p: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    device_type = "cuda" if snapshot_mode == "device" else "cpu"
    assert all(v.device.type == device_type for v in gov.last_good_state.values())
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5)
    model(torch.randn(4, 3, 8, 8, device="cuda"))
    optimizer.step()
    gov.execute_rollback()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    for p, state in expected_opt.items():
        for name, value in state.items():
            assert torch.equal(optimizer.state[p][name], value), name


@pytest.mark.cuda
def test_cuda_thousand_cycles_keep_allocated_bytes_flat():
    model = _small_model().cuda()
    gov = TolariaGovernor(model)
    for _ in range(20):
        gov.snapshot()
        gov.execute_rollback()
    before = torch.cuda.memory_allocated()
    for _ in range(1000):
        gov.snapshot()
        gov.execute_rollback()
    assert torch.cuda.memory_allocated() == before


def test_reference_mode_leaves_the_live_seed_out_too():
    model = ToyMorphogenetic()
    model.seed_slot.germinate(SeedStage.SHADOWING)
    with reference_mode():
        gov = TolariaGovernor(model)
        assert set(gov.last_good_state) == {"host.weight", "host.bias"}
        gov.execute_rollback()
    assert model.seed_slot.culled == ["governor_rollback"]
