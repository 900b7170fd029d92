"""The fused metrics kernels, MetricsAccumulator and StackedMetricsAccumulator against the
original composite algorithm."""

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import esper_fast  # noqa: F401  (registers torch.ops.esper_fast)
from esper_fast.ops import MetricsAccumulator, MetricsResult, StackedMetricsAccumulator
from esper_fast.ops.reference import batch_metrics_reference, cross_entropy_reference
from tolerances import FLOAT_DTYPES

# The loss is computed in float32 math (float64 sums) against a float64 oracle on the same inputs.
LOSS_RTOL, LOSS_ATOL = 2e-5, 2e-5


def _rows_for(classes, rows):
    """Keep the 50257-wide case small on CPU."""
    return min(rows, 33) if classes == 50257 else rows


def _expected(logits, targets, per_class, ignore_index=-100):
    """The original's numbers for one batch, counting only rows whose target is a class."""
    classes = logits.size(1)
    counted = (targets >= 0) & (targets < classes)
    loss = cross_entropy_reference(logits, targets, ignore_index).item()
    ref = batch_metrics_reference(logits[counted], targets[counted], classes, per_class)
    return loss, ref


def _assert_loss(actual, expected, what="loss"):
    if math.isnan(expected):
        assert math.isnan(actual), f"{what}: expected NaN, got {actual}"
    else:
        assert actual == pytest.approx(expected, rel=LOSS_RTOL, abs=LOSS_ATOL), what


@pytest.mark.parametrize("per_class", [False, True], ids=["total", "per_class"])
@pytest.mark.parametrize("rows", [0, 1, 7, 4097])
@pytest.mark.parametrize("classes", [1, 2, 10, 1000, 50257])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float64], ids=str)
def test_matches_reference(device, dtype, classes, rows, per_class):
    rows = _rows_for(classes, rows)
    logits = (torch.randn(rows, classes) * 4).to(device=device, dtype=dtype)
    targets = torch.randint(0, classes, (rows,), device=device)
    acc = MetricsAccumulator(classes, device, per_class=per_class)
    acc.update(logits, targets)
    result = acc.compute()

    loss, ref = _expected(logits, targets, per_class)
    _assert_loss(result.loss, loss)
    assert result.batches == 1
    assert result.total == rows
    assert result.correct == int(ref["correct"])
    if per_class:
        assert result.class_total == ref["class_total"].tolist()
        assert result.class_correct == ref["class_correct"].tolist()
    else:
        assert result.class_total is None and result.class_correct is None


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("classes", [3, 10, 1000, 50257])
def test_argmax_ties_and_nan_follow_torch_argmax(device, dtype, classes):
    """Targets set to torch.argmax must all hit, the next index must all miss."""
    rows = 9 if classes == 50257 else 64
    logits = torch.randint(-2, 3, (rows, classes)).to(dtype)  # many exact ties
    logits[1] = 5.0  # the whole row tied
    logits[2, classes // 2] = float("nan")
    logits[3, -1] = float("nan")
    logits[3, 1] = float("nan")
    logits[4, 0] = float("nan")
    logits[5] = float("-inf")
    logits[6, classes - 1] = float("inf")
    logits[7, :] = float("-inf")
    logits[7, classes // 3] = 0.0
    logits = logits.to(device)
    best = torch.argmax(logits, dim=1)
    for targets, expected in ((best, rows), ((best + 1) % classes, 0)):
        acc = MetricsAccumulator(classes, device, per_class=True)
        acc.update(logits, targets)
        result = acc.compute()
        assert result.correct == expected
        assert result.class_correct == torch.bincount(targets[best == targets], minlength=classes).tolist()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("classes", [4, 50257])
def test_nonfinite_rows_loss(device, dtype, classes):
    """-inf entries are fine; a NaN, +inf or all -inf row makes the batch loss NaN, as in torch."""
    logits = torch.randn(4, classes).to(dtype)
    logits[0, 0] = float("-inf")
    logits[2, 1:3] = float("-inf")
    targets = torch.tensor([1, 0, 0, 3])
    finite = MetricsAccumulator(classes, device)
    finite.update(logits.to(device), targets.to(device))
    _assert_loss(finite.compute().loss, cross_entropy_reference(logits, targets).item())

    target_neg_inf = MetricsAccumulator(classes, device)
    target_neg_inf.update(logits.to(device), torch.tensor([0, 0, 0, 3], device=device))
    assert target_neg_inf.compute().loss == math.inf

    for poison in (float("nan"), float("inf")):
        bad = logits.clone()
        bad[3, classes - 1] = poison
        acc = MetricsAccumulator(classes, device)
        acc.update(bad.to(device), targets.to(device))
        assert math.isnan(cross_entropy_reference(bad, targets).item())
        assert math.isnan(acc.compute().loss)
    all_neg_inf = torch.full((1, classes), float("-inf"), dtype=dtype)
    acc = MetricsAccumulator(classes, device)
    acc.update(all_neg_inf.to(device), torch.tensor([0], device=device))
    assert math.isnan(acc.compute().loss)


def test_large_logits_are_stable(device):
    logits = torch.randn(16, 50) * 3 + 1.0e4
    targets = torch.randint(0, 50, (16,))
    acc = MetricsAccumulator(50, device)
    acc.update(logits.to(device), targets.to(device))
    _assert_loss(acc.compute().loss, cross_entropy_reference(logits, targets).item())


@pytest.mark.parametrize("classes", [10, 50257])
def test_ignore_index_rows(device, classes):
    rows = 12
    logits = torch.randn(rows, classes)
    targets = torch.randint(0, classes, (rows,))
    targets[::3] = -100
    acc = MetricsAccumulator(classes, device, per_class=True)
    acc.update(logits.to(device), targets.to(device))
    result = acc.compute()
    loss, ref = _expected(logits, targets, True)
    _assert_loss(result.loss, loss)
    assert result.total == rows  # the original divides by labels.numel()
    assert result.correct == int(ref["correct"])
    assert result.class_total == ref["class_total"].tolist()
    assert sum(result.class_total) == rows - 4


def test_ignore_index_inside_the_classes_still_counts_for_accuracy(device):
    """nn.CrossEntropyLoss(ignore_index=0) drops class-0 rows from the loss; argmax == labels does not."""
    logits = torch.randn(40, 5)
    targets = torch.randint(0, 5, (40,))
    logits[targets == 0, 0] = 10.0  # class-0 rows are all predicted right
    acc = MetricsAccumulator(5, device, per_class=True, ignore_index=0)
    acc.update(logits.to(device), targets.to(device))
    result = acc.compute()
    _assert_loss(result.loss, cross_entropy_reference(logits, targets, ignore_index=0).item())
    ref = batch_metrics_reference(logits, targets, 5, True)
    assert result.correct == int(ref["correct"])
    assert result.class_correct == ref["class_correct"].tolist()


def test_all_rows_ignored_gives_nan_like_torch(device):
    acc = MetricsAccumulator(10, device)
    acc.update(torch.randn(3, 10, device=device), torch.full((3,), -100, device=device))
    assert math.isnan(acc.compute().loss)


@pytest.mark.parametrize("classes", [10, 50257])
@pytest.mark.parametrize("bad", [10, 50257, -1, -7])
def test_out_of_range_target_raises_at_compute(device, classes, bad):
    if 0 <= bad < classes:
        pytest.skip("in range for this width")
    acc = MetricsAccumulator(classes, device, per_class=True)
    targets = torch.randint(0, classes, (8,))
    targets[5] = bad
    acc.update(torch.randn(8, classes, device=device), targets.to(device))  # no error, no sync here
    acc.update(torch.randn(8, classes, device=device), torch.randint(0, classes, (8,), device=device))
    with pytest.raises(ValueError, match=rf"outside \[0, {classes}\).*e\.g\. {bad}\b"):
        acc.compute()
    acc.reset()
    acc.update(torch.randn(2, classes, device=device), torch.zeros(2, dtype=torch.long, device=device))
    assert acc.compute().batches == 1


@pytest.mark.parametrize("rows,classes", [(20000, 10), (300, 2000)])
def test_out_of_range_reports_the_first_bad_target(device, rows, classes):
    """Several bad targets spread over the rows (over many CUDA blocks): the lowest row's is named,
    and a later batch's bad targets do not replace it."""
    targets = torch.randint(0, classes, (rows,))
    bad_rows = [rows - 1, 3, rows // 2, 7, rows // 3]
    for k, row in enumerate(bad_rows):
        targets[row] = classes + 100 + k  # the value names the row it was put in
    acc = MetricsAccumulator(classes, device)
    acc.update(torch.randn(rows, classes, device=device), targets.to(device))
    acc.update(torch.randn(4, classes, device=device), torch.full((4,), -5, device=device))
    with pytest.raises(ValueError, match=rf"9 target\(s\) outside .*e\.g\. {classes + 101}\b"):
        acc.compute()


def test_accumulates_mean_of_batch_means(device):
    """val_loss = sum of per-batch criterion values / batches, as the original computes it."""
    criterion = nn.CrossEntropyLoss()
    acc = MetricsAccumulator(10, device, per_class=True)
    losses, correct, totals, class_total = [], 0, 0, torch.zeros(10, dtype=torch.long)
    for rows in (5, 17, 1, 64):
        logits = torch.randn(rows, 10, device=device)
        targets = torch.randint(0, 10, (rows,), device=device)
        acc.update(logits, targets)
        losses.append(criterion(logits.double(), targets).item())
        correct += int((logits.argmax(1) == targets).sum())
        totals += rows
        class_total += torch.bincount(targets.cpu(), minlength=10)
    result = acc.compute()
    assert result.batches == 4
    assert result.loss_sum == pytest.approx(sum(losses), rel=1e-6)
    assert result.loss == pytest.approx(sum(losses) / 4, rel=1e-6)
    assert result.correct == correct and result.total == totals
    assert result.accuracy == pytest.approx(100.0 * correct / totals)
    assert result.class_total == class_total.tolist()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_given_loss_from_another_criterion(device, dtype):
    criteria = [
        nn.CrossEntropyLoss(label_smoothing=0.1),
        nn.CrossEntropyLoss(weight=torch.rand(10, device=device) + 0.5),
        nn.CrossEntropyLoss(reduction="sum"),
    ]
    for criterion in criteria:
        acc = MetricsAccumulator(10, device)
        expected = 0.0
        correct = 0
        for _ in range(3):
            logits = torch.randn(32, 10, device=device).to(dtype)
            targets = torch.randint(0, 10, (32,), device=device)
            loss = criterion(logits.float(), targets)
            expected += loss.item()
            correct += int((logits.argmax(1) == targets).sum())
            acc.update(logits, targets, loss)
        result = acc.compute()
        assert result.loss_sum == pytest.approx(expected, rel=1e-6)
        assert result.correct == correct and result.total == 96


def test_reset_and_compute_all(device):
    a = MetricsAccumulator(4, device, per_class=True)
    b = MetricsAccumulator(7, device)
    a.update(torch.randn(5, 4, device=device), torch.randint(0, 4, (5,), device=device))
    b.update(torch.randn(3, 7, device=device), torch.randint(0, 7, (3,), device=device))
    b.update(torch.randn(2, 7, device=device), torch.randint(0, 7, (2,), device=device))
    both = MetricsAccumulator.compute_all([a, b])
    assert both == [a.compute(), b.compute()]
    assert both[1].batches == 2 and both[1].total == 5 and sum(both[0].class_total) == 5
    a.reset()
    empty = a.compute()
    assert empty == MetricsResult(0.0, 0, 0, 0, [0] * 4, [0] * 4)
    assert math.isnan(empty.loss) and empty.accuracy == 0.0


def test_non_contiguous_inputs_are_accepted(device):
    wide = torch.randn(16, 20, device=device)
    logits = wide[:, ::2]
    targets = torch.randint(0, 10, (32,), device=device)[::2]
    acc = MetricsAccumulator(10, device)
    acc.update(logits, targets)
    loss, ref = _expected(logits.cpu(), targets.cpu(), False)
    result = acc.compute()
    _assert_loss(result.loss, loss)
    assert result.correct == int(ref["correct"])


def test_input_validation():
    acc = MetricsAccumulator(10, "cpu")
    with pytest.raises(ValueError, match=r"logits must be \[N, 10\]"):
        acc.update(torch.randn(4, 9), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logits must be \[N, 10\]"):
        acc.update(torch.randn(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="float"):
        acc.update(torch.zeros(4, 10, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets must be \[4\]"):
        acc.update(torch.randn(4, 10), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        acc.update(torch.randn(4, 10), torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="one-element float tensor"):
        acc.update(torch.randn(4, 10), torch.zeros(4, dtype=torch.long), torch.ones(2))
    with pytest.raises(ValueError, match="num_classes"):
        MetricsAccumulator(0, "cpu")
    # The op checks its own arguments too.
    with pytest.raises(RuntimeError, match="state has 3 slots"):
        torch.ops.esper_fast.metrics_update(
            torch.randn(2, 10), torch.zeros(2, dtype=torch.long), None, torch.zeros(3, dtype=torch.long), -100
        )
    with pytest.raises(RuntimeError, match=r"at most 1073741824 classes, got C = 1073741825"):
        torch.ops.esper_fast.metrics_update(
            torch.empty(0, 2**30 + 1), torch.zeros(0, dtype=torch.long), None, torch.zeros(10, dtype=torch.long), -100
        )
    with pytest.raises(RuntimeError, match="rows must be contiguous"):
        torch.ops.esper_fast.metrics_update(
            torch.randn(10, 2).t(), torch.zeros(2, dtype=torch.long), None, torch.zeros(10, dtype=torch.long), -100
        )


def test_all_reduce_is_a_noop_without_process_group():
    acc = MetricsAccumulator(3, "cpu")
    acc.update(torch.randn(4, 3), torch.randint(0, 3, (4,)))
    before = acc.compute()
    acc.all_reduce()
    assert acc.compute() == before


def test_all_reduce_sums_in_a_single_rank_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        acc = MetricsAccumulator(3, "cpu", per_class=True)
        acc.update(torch.randn(4, 3), torch.randint(0, 3, (4,)))
        before = acc.compute()
        acc.all_reduce()
        assert acc.compute() == before
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("with_loss", [False, True], ids=["kernel_loss", "given_loss"])
@pytest.mark.parametrize("per_class", [False, True], ids=["total", "per_class"])
@pytest.mark.parametrize("classes", [10, 2000])
def test_opcheck(device, classes, per_class, with_loss):
    logits = torch.randn(6, classes, device=device)
    targets = torch.randint(0, classes, (6,), device=device)
    state = MetricsAccumulator(classes, device, per_class=per_class).state
    loss = torch.tensor(0.5, device=device) if with_loss else None
    torch.library.opcheck(torch.ops.esper_fast.metrics_update.default, (logits, targets, loss, state, -100))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(0, 40),
    classes=st.integers(1, 70),
    levels=st.integers(1, 6),
    dtype=st.sampled_from(FLOAT_DTYPES),
    ignore_every=st.integers(0, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_random_batches_match_reference(device, rows, classes, levels, dtype, ignore_every, seed):
    """Invariants over random shapes with heavy ties: counts exact, loss close, sums consistent."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, levels, (rows, classes), generator=g).to(dtype) * 0.75
    targets = torch.randint(0, classes, (rows,), generator=g)
    if ignore_every:
        targets[::ignore_every] = -100
    acc = MetricsAccumulator(classes, device, per_class=True)
    acc.update(logits.to(device), targets.to(device))
    result = acc.compute()
    loss, ref = _expected(logits, targets, True)
    _assert_loss(result.loss, loss)
    assert result.total == rows and result.batches == 1
    assert result.correct == int(ref["correct"]) <= rows
    assert result.class_total == ref["class_total"].tolist()
    assert result.class_correct == ref["class_correct"].tolist()
    assert sum(result.class_correct) == result.correct


def test_torch_compile_fullgraph(device):
    """The op traces into a compiled graph (declared mutation, fake kernel) and counts as eager does."""
    from esper_fast.ops.metrics import metrics_update

    @torch.compile(fullgraph=True)
    def step(x, targets, state):
        logits = x * 2.0
        metrics_update(logits, targets, None, state, -100)
        return logits.sum()

    x = torch.randn(16, 10, device=device)
    targets = torch.randint(0, 10, (16,), device=device)
    compiled = MetricsAccumulator(10, device, per_class=True)
    eager = MetricsAccumulator(10, device, per_class=True)
    for _ in range(2):
        step(x, targets, compiled.state)
        eager.update(x * 2.0, targets)
    assert compiled.compute() == eager.compute()


@pytest.mark.cuda
@pytest.mark.parametrize("classes", [10, 1000, 50257])
def test_cuda_batch_loop_never_synchronises(classes):
    device = "cuda"
    rows = 64 if classes == 50257 else 512
    batches = [
        (
            torch.randn(rows, classes, device=device, dtype=torch.bfloat16),
            torch.randint(0, classes, (rows,), device=device),
        )
        for _ in range(5)
    ]
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    kernel_loss = MetricsAccumulator(classes, device, per_class=True)
    given_loss = MetricsAccumulator(classes, device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for logits, targets in batches:
            kernel_loss.update(logits, targets)
            given_loss.update(logits, targets, criterion(logits, targets))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    result = kernel_loss.compute()
    expected = sum(cross_entropy_reference(x, t).item() for x, t in batches) / len(batches)
    _assert_loss(result.loss, expected)
    assert result.correct == sum(int((x.argmax(1) == t).sum()) for x, t in batches)
    assert given_loss.compute().batches == len(batches)


@pytest.mark.cuda
def test_cuda_misaligned_rows_and_many_blocks():
    """Odd widths start rows at every alignment; more rows than blocks exercises the grid stride."""
    for dtype in FLOAT_DTYPES:
        for classes in (1025, 4099, 50257):
            rows = 4096 if classes < 50257 else 600
            logits = torch.randn(rows, classes, device="cuda", dtype=dtype) * 3
            targets = torch.randint(0, classes, (rows,), device="cuda")
            acc = MetricsAccumulator(classes, "cuda", per_class=True)
            acc.update(logits[1:], targets[1:])  # a row view whose start is not 16-byte aligned
            result = acc.compute()
            loss, ref = _expected(logits[1:], targets[1:], True)
            _assert_loss(result.loss, loss)
            assert result.correct == int(ref["correct"])
            assert result.class_correct == ref["class_correct"].tolist()


# Long-row widths whose 16-byte packs end at every point of a thread's unrolled loads (4 packs per
# thread and step, 256 threads per block below 16384 classes, 512 above): in the first, second,
# third or fourth pack of the first or a later step, or exactly at a step's end.
LONG_ROW_CLASSES = [1025, 1031, 2051, 3001, 4099, 5003, 16411, 20011, 30011, 32771, 50257]


def _long_rows(dtype, classes, offset, rows=24):
    """rows x classes logits starting `offset` elements into their storage, with heavy ties and
    rows 4..9 non-finite: NaN (one, two), +inf, all -inf, -inf but one, two +inf."""
    g = torch.Generator().manual_seed(classes * 7 + offset)
    storage = (torch.randint(-3, 4, (rows * classes + offset,), generator=g) * 0.5).to(dtype)
    logits = storage[offset:].view(rows, classes)
    logits[1, classes - 1] = 9.0  # the maximum in the scalar tail
    logits[2, 0] = 9.0  # in the scalar head
    logits[3, :] = 2.0  # the whole row tied
    logits[4, classes // 2] = float("nan")
    logits[5, classes - 2] = float("nan")
    logits[5, 3] = float("nan")
    logits[6, classes - 1] = float("inf")
    logits[7, :] = float("-inf")
    logits[8, :] = float("-inf")
    logits[8, classes * 3 // 4] = 0.0
    logits[9, classes - 3] = float("inf")
    logits[9, 700] = float("inf")
    return storage, logits


@pytest.mark.cuda
@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("classes", LONG_ROW_CLASSES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float64], ids=str)
def test_cuda_long_rows_every_unroll_tail(dtype, classes, offset):
    """The long-row kernel at every unroll tail, rows starting at any alignment of a sliced
    storage: torch.argmax's ties and NaN order, the loss of the finite rows, NaN for the others."""
    storage, logits_cpu = _long_rows(dtype, classes, offset)
    logits = storage.cuda()[offset:].view(logits_cpu.shape)
    assert logits.storage_offset() == offset and logits.is_contiguous()
    rows = logits.shape[0]
    best = logits_cpu.argmax(1)
    assert best[1] == classes - 1 and best[2] == 0 and best[3] == 0 and best[5] == 3 and best[9] == 700
    for targets, expected in ((best, rows), ((best + 1) % classes, 0)):
        acc = MetricsAccumulator(classes, "cuda", per_class=True)
        acc.update(logits, targets.cuda())
        result = acc.compute()
        assert result.correct == expected
        assert result.class_correct == torch.bincount(targets[best == targets], minlength=classes).tolist()
        assert math.isnan(result.loss)  # rows 4..9 poison the batch mean, as in torch
    targets = torch.randint(0, classes, (rows,))
    finite = (slice(0, 4), slice(10, rows))  # each slice starts at its own offset
    acc = MetricsAccumulator(classes, "cuda", per_class=True)
    for part in finite:
        acc.update(logits[part], targets[part].cuda())
    result = acc.compute()
    expected = sum(cross_entropy_reference(logits_cpu[part], targets[part]).item() for part in finite)
    _assert_loss(result.loss_sum, expected)
    assert result.correct == int((best[:4] == targets[:4]).sum() + (best[10:] == targets[10:]).sum())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_lm_sized_pass(dtype):
    """8192 x 50257, the benchmark's LM pass: counts exact and the loss close to float64's."""
    rows, classes = 8192, 50257
    logits = (torch.randn(rows, classes, device="cuda") * 2).to(dtype)
    targets = torch.randint(0, classes, (rows,), device="cuda")
    targets[::97] = -100
    logits[::13, 5] = 40.0
    targets[::13] = 5
    acc = MetricsAccumulator(classes, "cuda", per_class=True)
    acc.update(logits, targets)
    result = acc.compute()
    loss_sum, valid, correct = 0.0, 0, 0
    for start in range(0, rows, 1024):
        x, t = logits[start : start + 1024], targets[start : start + 1024]
        loss_sum += nn.functional.cross_entropy(x.double(), t, reduction="sum").item()
        valid += int((t != -100).sum())
        correct += int((x.argmax(1) == t).sum())
    _assert_loss(result.loss, loss_sum / valid)
    assert result.correct == correct and result.total == rows
    counted = targets[targets >= 0]
    assert result.class_total == torch.bincount(counted, minlength=classes).tolist()


@pytest.mark.cuda
@pytest.mark.parametrize("rows,classes", [(20000, 10), (300000, 2), (3000, 1025)])
def test_cuda_more_rows_than_the_grid(rows, classes):
    """More rows than one pass of the grid (the blocks resident at once): blocks stride over the
    rows, and every block's partial reaches the sums."""
    logits = torch.randn(rows, classes, device="cuda") * 3
    targets = torch.randint(0, classes, (rows,), device="cuda")
    targets[::7] = -100
    acc = MetricsAccumulator(classes, "cuda", per_class=True)
    acc.update(logits, targets)
    result = acc.compute()
    loss, ref = _expected(logits, targets, True)
    _assert_loss(result.loss, loss)
    assert result.total == rows and result.correct == int(ref["correct"])
    assert result.class_total == ref["class_total"].tolist()
    assert result.class_correct == ref["class_correct"].tolist()


@pytest.mark.cuda
@pytest.mark.parametrize("rows,classes", [(300000, 10), (4000, 4099)])
def test_cuda_loss_is_the_same_from_run_to_run(rows, classes):
    """The batch's cross-entropy sum is added block by block in a fixed order (no float atomics):
    the accumulated bits are identical over runs."""
    logits = torch.randn(rows, classes, device="cuda") * 4
    targets = torch.randint(0, classes, (rows,), device="cuda")
    states = set()
    for _ in range(10):
        acc = MetricsAccumulator(classes, "cuda")
        acc.update(logits, targets)
        acc.update(logits[: rows // 3], targets[: rows // 3])
        states.add(tuple(acc.state.tolist()))
    assert len(states) == 1


@pytest.mark.cuda
def test_cuda_denormal_logits_are_not_flushed():
    """argmax of [0.0, 1e-40] is 1 (no .ftz: the kernels keep float32 denormals)."""
    tiny = torch.finfo(torch.float32).tiny
    logits = torch.tensor([[0.0, 1e-40], [1e-40, 0.0], [-1e-40, 0.0], [tiny / 4, tiny / 2], [-tiny / 2, -tiny / 4]])
    logits = torch.cat([logits, torch.zeros(3, 2)]).repeat(5, 1)
    expected = logits.argmax(1)
    assert expected[:5].tolist() == [1, 0, 1, 1, 1]
    for classes in (2, 1500):  # the short-row and the long-row kernel
        wide = torch.full((logits.shape[0], classes), -1.0)
        wide[:, classes - 2 :] = logits
        targets = wide.argmax(1)
        acc = MetricsAccumulator(classes, "cuda", per_class=True)
        acc.update(wide.cuda(), targets.cuda())
        result = acc.compute()
        assert result.correct == wide.shape[0]
        assert result.class_correct == torch.bincount(targets, minlength=classes).tolist()


@pytest.mark.cuda
def test_cuda_logits_past_int32_elements():
    """42800 x 50257 bfloat16: 2.15e9 elements, row offsets past 2**31."""
    rows, classes = 42800, 50257
    free, _ = torch.cuda.mem_get_info()
    if free < 8 * 2**30:
        pytest.skip("needs about 8 GB of free GPU memory")
    logits = torch.randn(rows, classes, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, classes, (rows,), device="cuda")
    # The last rows' argmax at known places, far past 2**31 elements.
    logits[-3:, 17] = 30.0
    targets[-2:] = 17
    acc = MetricsAccumulator(classes, "cuda")
    acc.update(logits, targets)
    result = acc.compute()
    loss_sum, correct = 0.0, 0
    for start in range(0, rows, 2000):
        x, t = logits[start : start + 2000], targets[start : start + 2000]
        loss_sum += nn.functional.cross_entropy(x.double(), t, reduction="sum").item()
        correct += int((x.argmax(1) == t).sum())
    _assert_loss(result.loss, loss_sum / rows)
    assert result.correct == correct and result.total == rows


@pytest.mark.cuda
def test_cuda_update_on_a_side_stream():
    """The kernel runs on the current stream: logits written behind a sleep on that stream are
    read after the write."""
    logits = torch.randn(512, 1000, device="cuda")
    targets = torch.randint(0, 1000, (512,), device="cuda")
    acc = MetricsAccumulator(1000, "cuda", per_class=True)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        logits.mul_(-3.0)
        acc.update(logits, targets)
    side.synchronize()
    loss, ref = _expected(logits, targets, True)
    result = acc.compute()
    _assert_loss(result.loss, loss)
    assert result.correct == int(ref["correct"]) and result.class_correct == ref["class_correct"].tolist()


@pytest.mark.cuda
@pytest.mark.parametrize("classes", [10, 1000, 50257])
def test_cuda_two_states_on_two_streams_at_once(classes):
    """Two accumulators updated from two streams with no order between them: each launch keeps
    to its own state (ticket, partials, per-class atomics), so each ends with the numbers of its
    own batches, bit for bit those of a serial run."""
    rows = 48 if classes == 50257 else 512
    batches = 12 if classes == 50257 else 40
    data = [
        [
            (torch.randn(rows - k, classes, device="cuda") * 3, torch.randint(0, classes, (rows - k,), device="cuda"))
            for _ in range(batches)
        ]
        for k in range(2)
    ]
    accumulators = [MetricsAccumulator(classes, "cuda", per_class=True) for _ in range(2)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    for i in range(batches):
        for k in range(2):
            with torch.cuda.stream(streams[k]):
                accumulators[k].update(*data[k][i])
    torch.cuda.synchronize()
    for k in range(2):
        serial = MetricsAccumulator(classes, "cuda", per_class=True)
        for logits, targets in data[k]:
            serial.update(logits, targets)
        assert torch.equal(accumulators[k].state, serial.state), f"stream {k}"
        result = accumulators[k].compute()
        expected = sum(cross_entropy_reference(x, t).item() for x, t in data[k]) / batches
        _assert_loss(result.loss, expected)
        assert result.batches == batches and result.total == batches * (rows - k)
        assert result.correct == sum(int((x.argmax(1) == t).sum()) for x, t in data[k])
        assert result.class_total == sum(torch.bincount(t, minlength=classes) for _, t in data[k]).tolist()
        assert result.class_correct == sum(
            torch.bincount(t[x.argmax(1) == t], minlength=classes) for x, t in data[k]
        ).tolist()


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_update_on_the_second_device_while_the_first_is_current():
    torch.cuda.set_device(0)
    for classes in (10, 2000):
        logits = torch.randn(300, classes, device="cuda:1")
        targets = torch.randint(0, classes, (300,), device="cuda:1")
        acc = MetricsAccumulator(classes, "cuda:1", per_class=True)
        acc.update(logits, targets)
        result = acc.compute()
        loss, ref = _expected(logits.cpu(), targets.cpu(), True)
        _assert_loss(result.loss, loss)
        assert result.correct == int(ref["correct"]) and result.class_total == ref["class_total"].tolist()
    assert torch.cuda.current_device() == 0


@pytest.mark.parametrize("width", [0, 2, 3, 5])
def test_packed_sums_round_trip_through_the_result(width):
    acc = MetricsAccumulator(3, "cpu", per_class=True)
    logits, targets = torch.randn(7, 3), torch.tensor([0, 1, 2, 2, 1, 0, 2])
    acc.update(logits, targets)
    direct = acc.compute()
    packed = acc.packed(width)
    assert packed.dtype == torch.float64 and packed.numel() == MetricsAccumulator.PACKED_HEADER + 2 * width
    result = MetricsAccumulator.result_from_packed(packed, width, 3)
    assert (result.loss_sum, result.batches, result.correct, result.total) == (
        direct.loss_sum, direct.batches, direct.correct, direct.total
    )
    n = min(width, 3)
    if width:
        assert result.class_total[:n] == direct.class_total[:n] and result.class_total[n:] == [0] * (width - n)
        assert result.class_correct[:n] == direct.class_correct[:n]
    else:
        assert result.class_total is None


def test_packed_sums_carry_a_bad_target():
    acc = MetricsAccumulator(3, "cpu")
    acc.update(torch.randn(2, 3), torch.tensor([1, 7]))
    with pytest.raises(ValueError, match=r"1 target\(s\) outside \[0, 3\), e.g. 7"):
        MetricsAccumulator.result_from_packed(acc.packed(), 0, 3)


# ---------------------------------------------------------------- stacked configurations


def _stacked_batches(configs, rows, classes, dtype, device, batches=2, ignore_every=4, seed=0):
    """`batches` batches of K stacked configurations: (logits [K * N, C], targets [N]), with ties,
    ignored rows and configurations that differ from each other."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(batches):
        logits = (torch.randint(-4, 5, (configs * rows, classes), generator=g, dtype=torch.int16) * 0.75).to(dtype)
        logits += (torch.randn(configs * rows, classes, generator=g) * 2).to(dtype)
        targets = torch.randint(0, classes, (rows,), generator=g)
        if ignore_every:
            targets[::ignore_every] = -100
        data.append((logits.to(device), targets.to(device)))
    return data


def _separate(data, configs, classes, device, per_class, ignore_index=-100):
    """K MetricsAccumulators, configuration k fed rows k * N .. (k + 1) * N - 1 of each batch."""
    accumulators = [MetricsAccumulator(classes, device, per_class=per_class, ignore_index=ignore_index)
                    for _ in range(configs)]
    for logits, targets in data:
        rows = targets.shape[0]
        for k, acc in enumerate(accumulators):
            acc.update(logits[k * rows : (k + 1) * rows], targets)
    return accumulators


def _assert_stacked_equals_separate(stacked, separate, data):
    """Bit for bit the separate accumulators' sums, and those against the float64 reference."""
    for k, acc in enumerate(separate):
        assert torch.equal(stacked.state[k], acc.state), f"configuration {k}: {stacked.state[k]} != {acc.state}"
    results = stacked.compute()
    nan_free = [dataclasses.replace(r, loss_sum=0.0 if math.isnan(r.loss_sum) else r.loss_sum) for r in results]
    separate_results = MetricsAccumulator.compute_all(separate)
    assert nan_free == [
        dataclasses.replace(r, loss_sum=0.0 if math.isnan(r.loss_sum) else r.loss_sum) for r in separate_results
    ]
    assert [math.isnan(r.loss_sum) for r in results] == [math.isnan(r.loss_sum) for r in separate_results]
    for k, result in enumerate(results):
        rows = data[0][1].shape[0]
        expected = sum(
            cross_entropy_reference(x[k * rows : (k + 1) * rows], t, stacked.ignore_index).item() for x, t in data
        )
        _assert_loss(result.loss_sum, expected, f"configuration {k}")
        assert result.batches == len(data) and result.total == rows * len(data)


@pytest.mark.parametrize("per_class", [False, True], ids=["total", "per_class"])
@pytest.mark.parametrize("rows", [0, 1, 37])
@pytest.mark.parametrize("configs", [1, 2, 5, 16])
@pytest.mark.parametrize("classes", [1, 10, 1000, 2051])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float64], ids=str)
def test_stacked_matches_separate_accumulators(device, dtype, classes, configs, rows, per_class):
    data = _stacked_batches(configs, rows, classes, dtype, device)
    stacked = StackedMetricsAccumulator(configs, classes, device, per_class=per_class)
    for logits, targets in data:
        stacked.update(logits, targets)
    _assert_stacked_equals_separate(stacked, _separate(data, configs, classes, device, per_class), data)


@pytest.mark.parametrize("configs", range(1, 17))
def test_stacked_every_k_from_1_to_16(device, configs):
    data = _stacked_batches(configs, 19, 7, torch.float32, device, batches=3, seed=configs)
    stacked = StackedMetricsAccumulator(configs, 7, device, per_class=True)
    for logits, targets in data:
        stacked.update(logits, targets)
    _assert_stacked_equals_separate(stacked, _separate(data, configs, 7, device, True), data)
    results = stacked.compute()
    assert all(r.class_total == results[0].class_total for r in results)  # the targets are shared


def test_stacked_ignore_index_inside_the_classes(device):
    data = _stacked_batches(3, 40, 5, torch.float32, device, ignore_every=0)
    for _, targets in data:
        targets[targets == 2] = 0  # more rows of the ignored class
    stacked = StackedMetricsAccumulator(3, 5, device, per_class=True, ignore_index=0)
    for logits, targets in data:
        stacked.update(logits, targets)
    _assert_stacked_equals_separate(stacked, _separate(data, 3, 5, device, True, ignore_index=0), data)


@pytest.mark.parametrize("classes", [10, 2051])
def test_stacked_bad_targets_raise_at_compute(device, classes):
    configs, rows = 4, 30
    stacked = StackedMetricsAccumulator(configs, classes, device, per_class=True)
    targets = torch.randint(0, classes, (rows,))
    targets[[21, 6]] = torch.tensor([classes + 5, -3])
    stacked.update(torch.randn(configs * rows, classes, device=device), targets.to(device))  # no error, no sync
    stacked.update(torch.randn(configs * 2, classes, device=device), torch.tensor([-9, 1], device=device))
    with pytest.raises(ValueError, match=rf"3 target\(s\) outside \[0, {classes}\).*e\.g\. -3\b"):
        stacked.compute()
    for k in range(configs):  # every configuration counted them, and kept the first batch's first
        acc = stacked.accumulators[k]
        with pytest.raises(ValueError, match=r"3 target\(s\).*e\.g\. -3\b"):
            acc.compute()
    stacked.reset()
    stacked.update(torch.randn(configs, classes, device=device), torch.zeros(1, dtype=torch.long, device=device))
    assert [r.batches for r in stacked.compute()] == [1] * configs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_stacked_lm_sized_rows(device, dtype):
    """C = 50257: the long-row kernel on CUDA (K = 8, N = 1024 there), moderate sizes on CPU."""
    configs, rows = (8, 1024) if device == "cuda" else (3, 4)
    data = _stacked_batches(configs, rows, 50257, dtype, device, batches=1, ignore_every=9)
    stacked = StackedMetricsAccumulator(configs, 50257, device)
    stacked.update(*data[0])
    _assert_stacked_equals_separate(stacked, _separate(data, configs, 50257, device, False), data)


def test_stacked_accumulators_serve_compute_all_and_the_rank_reduction(tmp_path):
    import torch.distributed as dist

    from esper_fast.tolaria.distributed import reduce_results

    data = _stacked_batches(3, 12, 6, torch.float32, "cpu")
    stacked = StackedMetricsAccumulator(3, 6, "cpu", per_class=True)
    other = MetricsAccumulator(4, "cpu")
    other.update(torch.randn(5, 4), torch.randint(0, 4, (5,)))
    for logits, targets in data:
        stacked.update(logits, targets)
    expected = stacked.compute()
    assert MetricsAccumulator.compute_all(stacked.accumulators + [other]) == expected + [other.compute()]
    stacked.all_reduce()  # no process group: nothing happens
    assert stacked.compute() == expected
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert reduce_results(stacked.accumulators, [6] * 3, dist.group.WORLD) == expected
        stacked.all_reduce()  # one rank: the sums are unchanged
        assert stacked.compute() == expected
    finally:
        dist.destroy_process_group()


def test_stacked_input_validation():
    stacked = StackedMetricsAccumulator(3, 10, "cpu")
    with pytest.raises(ValueError, match=r"logits must be \[K \* N, 10\]"):
        stacked.update(torch.randn(6, 9), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets must be \[N\] with K \* N = 7 logits rows for K = 3"):
        stacked.update(torch.randn(7, 10), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        stacked.update(torch.randn(6, 10), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="float"):
        stacked.update(torch.zeros(6, 10, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="num_configs"):
        StackedMetricsAccumulator(0, 10, "cpu")
    with pytest.raises(ValueError, match="num_classes"):
        StackedMetricsAccumulator(2, 0, "cpu")
    op = torch.ops.esper_fast.metrics_update_stacked
    state = torch.zeros(3, MetricsAccumulator(10, "cpu").state.numel(), dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"targets must be \[N\] with K \* N = 7 logits rows for K = 3"):
        op(torch.randn(7, 10), torch.zeros(2, dtype=torch.long), state, -100)
    with pytest.raises(RuntimeError, match=r"state must be a contiguous 2-d \[K, slots\] int64 tensor"):
        op(torch.randn(6, 10), torch.zeros(2, dtype=torch.long), state.view(-1), -100)
    with pytest.raises(RuntimeError, match="state has 3 slots per configuration"):
        op(torch.randn(6, 10), torch.zeros(2, dtype=torch.long), torch.zeros(3, 3, dtype=torch.long), -100)
    with pytest.raises(RuntimeError, match=r"1 to 65535 configurations \(state rows\), got 0"):
        op(torch.randn(0, 10), torch.zeros(2, dtype=torch.long), torch.zeros(0, state.shape[1], dtype=torch.long),
           -100)


def test_stacked_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = torch.ops.esper_fast.metrics_update_stacked.default
    width = MetricsAccumulator(10, "cpu", per_class=True).state.numel()
    with FakeTensorMode():
        state = torch.zeros(4, width, dtype=torch.long)
        assert op(torch.empty(4 * 3, 10), torch.zeros(3, dtype=torch.long), state, -100) is None
        assert state.shape == (4, width)
        with pytest.raises(RuntimeError, match=r"K \* N = 4 \* 3 rows, got 13"):
            op(torch.empty(13, 10), torch.zeros(3, dtype=torch.long), state, -100)
        with pytest.raises(RuntimeError, match="2-d"):
            op(torch.empty(12, 10), torch.zeros(3, dtype=torch.long), state.view(-1), -100)


@pytest.mark.parametrize("per_class", [False, True], ids=["total", "per_class"])
@pytest.mark.parametrize("classes", [10, 2000])
def test_stacked_opcheck(device, classes, per_class):
    data = _stacked_batches(3, 6, classes, torch.float32, device, batches=1)
    state = StackedMetricsAccumulator(3, classes, device, per_class=per_class).state
    torch.library.opcheck(torch.ops.esper_fast.metrics_update_stacked.default, (*data[0], state, -100))


def test_stacked_torch_compile_fullgraph(device):
    """A compiled step that calls update traces whole and counts as eager does."""
    torch._dynamo.reset()
    compiled_acc = StackedMetricsAccumulator(4, 10, device, per_class=True)
    eager_acc = StackedMetricsAccumulator(4, 10, device, per_class=True)

    def step(acc, x, targets):
        logits = x * 2.0
        acc.update(logits, targets)
        return logits.sum()

    compiled = torch.compile(step, fullgraph=True)
    for logits, targets in _stacked_batches(4, 16, 10, torch.float32, device, batches=2):
        compiled(compiled_acc, logits, targets)
        step(eager_acc, logits, targets)
    assert torch.equal(compiled_acc.state, eager_acc.state)
    assert compiled_acc.compute() == eager_acc.compute()


@pytest.mark.cuda
def test_cuda_stacked_batch_loop_never_synchronises():
    data = _stacked_batches(4, 128, 10, torch.float32, "cuda", batches=5)
    stacked = StackedMetricsAccumulator(4, 10, "cuda", per_class=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for logits, targets in data:
            stacked.update(logits, targets)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _assert_stacked_equals_separate(stacked, _separate(data, 4, 10, "cuda", True), data)


@pytest.mark.cuda
@pytest.mark.parametrize("rows,classes", [(20000, 10), (3000, 1025)])
def test_cuda_stacked_more_rows_than_the_grid(rows, classes):
    """Each configuration with more rows than one pass of its blocks: still the separate sums."""
    data = _stacked_batches(3, rows, classes, torch.float32, "cuda", batches=1, ignore_every=7)
    stacked = StackedMetricsAccumulator(3, classes, "cuda", per_class=True)
    stacked.update(*data[0])
    _assert_stacked_equals_separate(stacked, _separate(data, 3, classes, "cuda", True), data)

