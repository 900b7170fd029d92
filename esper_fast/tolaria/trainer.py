"""Tolaria training loops and validation, with validation metrics on the fused metrics kernel.

The three ``train_epoch_*`` loops are the original's. The two validation functions keep the
original's results but count with :class:`esper_fast.ops.MetricsAccumulator`: no device-to-host
synchronisation inside the batch loop and one read of the results per call. Under
``esper_fast.ops.reference_mode()`` they run the original algorithm instead (per-batch criterion,
argmax, ``torch.bincount`` per class, two attribution passes), which the benchmarks time against.

``validate_epoch`` and ``slot_attribution`` also judge every live seed of a model with several
slots (Shapley values, leave-one-out, alone-on, interactions; :mod:`esper_fast.tolaria.attribution`)
from the configurations of its slots, measured in the same pass over the test set.

Performance note: these functions are ``torch.compile`` compatible. For more speed, compile the
model before passing it in, e.g. ``train_epoch_normal(torch.compile(model), ...)``; the
metrics kernel is a registered custom op, so a compiled model's outputs feed it directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from collections.abc import Iterable

import torch
from torch import nn

from esper_fast.kasmina.host import forced_alphas, forward_each_configuration
from esper_fast.ops.metrics import MetricsAccumulator, MetricsResult, StackedMetricsAccumulator
from esper_fast.tolaria.attribution import AttributionPlan, SlotAttribution, attribute, plan_attribution
from esper_fast.tolaria.distributed import process_group, reduce_results
from esper_fast.ops.mode import using_reference
from esper_fast.ops.reference import batch_loss_reference, batch_metrics_reference

__all__ = [
    "AttributionResult",
    "EpochValidation",
    "validate_epoch",
    "SlotAttribution",
    "slot_attribution",
    "train_epoch_normal",
    "train_epoch_incubator_mode",
    "train_epoch_blended",
    "validate_and_get_metrics",
    "validate_with_attribution",
]

Batch = tuple[torch.Tensor, torch.Tensor]
# Anything that yields (inputs, labels) tensor pairs: a DataLoader, a list of batches, a generator.
BatchIterable = Iterable[Batch]

# Train metrics look at no more than this many batches of the train loader.
TRAIN_METRIC_BATCHES = 10
# Perplexity is reported as inf from this validation loss up (exp would overflow soon after).
PERPLEXITY_LOSS_LIMIT = 20.0


@dataclasses.dataclass
class AttributionResult:
    """Counterfactual validation: the model as is vs the same model with the seed's alpha at 0.

    Accuracies are percentages; ``seed_contribution = real_accuracy - baseline_accuracy``.
    """

    real_accuracy: float
    baseline_accuracy: float
    seed_contribution: float
    real_loss: float
    baseline_loss: float


@dataclasses.dataclass
class EpochValidation:
    """One epoch's validation: what ``validate_and_get_metrics`` returns, plus the
    counterfactual ``attribution`` of the main slot (None when not asked for or the model
    has no seed) and ``slot_attribution``, the attribution of every live slot (None when
    not asked for or no slot holds a live seed)."""

    val_loss: float
    val_accuracy: float
    train_loss: float
    train_accuracy: float
    per_class_acc: dict[int, float] | None
    perplexity: float | None
    attribution: AttributionResult | None
    slot_attribution: SlotAttribution | None = None


def _compute_loss(outputs: torch.Tensor, labels: torch.Tensor, criterion: nn.Module, task_type: str) -> torch.Tensor:
    """The criterion on a batch; lm outputs ``[B, T, V]`` and labels ``[B, T]`` are flattened first."""
    if task_type == "lm":
        return criterion(outputs.reshape(-1, outputs.size(-1)), labels.reshape(-1))
    return criterion(outputs, labels)


def _to_device(batch: Batch, device) -> Batch:
    inputs, labels = batch
    return inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def _train_epoch(model, trainloader, criterion, optimizers, device, task_type) -> None:
    model.train()
    for batch in trainloader:
        inputs, labels = _to_device(batch, device)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss = _compute_loss(model(inputs), labels, criterion, task_type)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()


def train_epoch_normal(
    model: nn.Module,
    trainloader: BatchIterable,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: str,
    task_type: str = "classification",
) -> None:
    """One epoch of plain training: per batch zero_grad, forward, loss, backward, step.

    Leaves the model in train mode.
    """
    _train_epoch(model, trainloader, criterion, (optimizer,), device, task_type)


def train_epoch_incubator_mode(
    model: nn.Module,
    trainloader: BatchIterable,
    criterion: nn.Module,
    host_optimizer: torch.optim.Optimizer,
    seed_optimizer: torch.optim.Optimizer,
    device: str,
    task_type: str = "classification",
) -> None:
    """One epoch with the seed incubating: host and seed optimizers both zeroed and stepped.

    The seed's output does not change the forward pass; it learns through the straight-through
    estimator inside the slot, while the host trains as usual.
    """
    _train_epoch(model, trainloader, criterion, (host_optimizer, seed_optimizer), device, task_type)


def train_epoch_blended(
    model: nn.Module,
    trainloader: BatchIterable,
    criterion: nn.Module,
    host_optimizer: torch.optim.Optimizer,
    seed_optimizer: torch.optim.Optimizer | None,
    device: str,
    task_type: str = "classification",
) -> None:
    """One epoch of joint training of host and blended seed; ``seed_optimizer`` may be None."""
    optimizers = (host_optimizer,) if seed_optimizer is None else (host_optimizer, seed_optimizer)
    _train_epoch(model, trainloader, criterion, optimizers, device, task_type)


# ---------------------------------------------------------------- validation: fused path


def _kernel_computes_loss(criterion: nn.Module) -> bool:
    """True when the criterion is exactly the default cross-entropy the kernel reproduces."""
    return (
        type(criterion) is nn.CrossEntropyLoss
        and criterion.weight is None
        and criterion.reduction == "mean"
        and criterion.label_smoothing == 0.0
    )


def _logits_and_targets(outputs: torch.Tensor, labels: torch.Tensor, task_type: str) -> Batch:
    if task_type == "lm":
        return outputs.reshape(-1, outputs.size(-1)), labels.reshape(-1)
    return outputs, labels


@dataclasses.dataclass(frozen=True)
class _ValidationSpec:
    """How a validation call measures: the loss, where batches go, and per-class counting
    (of the real configuration only; ``num_classes`` sizes it)."""

    criterion: nn.Module
    device: str
    task_type: str
    per_class: bool
    num_classes: int | None


class _FusedPass:
    """One validation pass's metrics; the accumulator is made at the first batch (C is known then)."""

    def __init__(self, criterion: nn.Module, task_type: str, per_class: bool):
        self.criterion = criterion
        self.task_type = task_type
        self.per_class = per_class
        self.kernel_loss = _kernel_computes_loss(criterion)
        self.ignore_index = int(getattr(criterion, "ignore_index", -100))
        self.accumulator: MetricsAccumulator | None = None

    def add(self, outputs: torch.Tensor, labels: torch.Tensor) -> None:
        logits, targets = _logits_and_targets(outputs, labels, self.task_type)
        if self.accumulator is None:
            self.accumulator = MetricsAccumulator(
                logits.size(-1), logits.device, per_class=self.per_class, ignore_index=self.ignore_index
            )
        loss = None if self.kernel_loss else _compute_loss(outputs, labels, self.criterion, self.task_type)
        self.accumulator.update(logits, targets, loss)


def _run_fused_pass(model, loader, spec: _ValidationSpec, per_class: bool) -> _FusedPass:
    fused = _FusedPass(spec.criterion, spec.task_type, per_class)
    for batch in loader:
        inputs, labels = _to_device(batch, spec.device)
        fused.add(model(inputs), labels)
    return fused


def _shares_the_host_pass(model: nn.Module) -> bool:
    # Only a model whose own class offers the one-pass counterfactual (not one reached through
    # a wrapper's __getattr__, such as torch.compile's or DDP's, whose forward differs).
    return callable(getattr(type(model), "forward_alpha_configs", None))


def _run_attribution_pass(model, loader, spec: _ValidationSpec) -> tuple[_FusedPass, _FusedPass]:
    """The real and the alpha-0 metrics over ``loader`` in one pass over the data.

    With a model that shares the host pass (:meth:`MorphogeneticModel.forward_alpha_configs`)
    each batch runs the host up to the slot once, the seed once and the rest of the host on
    both configurations together; any other model runs two forwards per batch, the second
    inside ``seed_slot.force_alpha(0.0)``.
    """
    slot = model.seed_slot
    real = _FusedPass(spec.criterion, spec.task_type, spec.per_class)
    baseline = _FusedPass(spec.criterion, spec.task_type, per_class=False)
    shared = _shares_the_host_pass(model)
    for batch in loader:
        inputs, labels = _to_device(batch, spec.device)
        if shared:
            real_outputs, baseline_outputs = model.forward_alpha_configs(inputs, (slot.alpha, 0.0))
        else:
            real_outputs = model(inputs)
            with slot.force_alpha(0.0):
                baseline_outputs = model(inputs)
        real.add(real_outputs, labels)
        baseline.add(baseline_outputs, labels)
    return real, baseline


def _forward_configurations(model, inputs: torch.Tensor, configurations: list[dict]) -> tuple[torch.Tensor, list[int]]:
    """The outputs of every configuration stacked along the batch, and each one's row group:
    the model's shared walk (:meth:`MorphogeneticModel.forward_configurations_stacked`), or
    for any other model one forward per configuration with its slots' alphas forced."""
    if callable(getattr(type(model), "forward_configurations_stacked", None)):
        return model.forward_configurations_stacked(inputs, configurations)
    outputs = forward_each_configuration(model, inputs, model.seed_slots, configurations)
    return torch.cat(outputs), list(range(len(outputs)))


class _ConfigurationsPass:
    """One validation pass's metrics of K configurations of the model, from their outputs
    stacked along the batch; per-class counts (with ``spec.per_class``) are read for the first.

    With the criterion the kernel computes the stacked logits go to one
    :class:`StackedMetricsAccumulator` (one kernel launch per batch for all K); with a custom
    criterion each configuration has its own :class:`_FusedPass`, which evaluates it.
    """

    def __init__(self, spec: _ValidationSpec, num_configs: int):
        self.spec = spec
        self.num_configs = num_configs
        self.stacked = _kernel_computes_loss(spec.criterion)
        self.metrics: StackedMetricsAccumulator | None = None
        self.passes = [] if self.stacked else [
            _FusedPass(spec.criterion, spec.task_type, per_class=spec.per_class and k == 0) for k in range(num_configs)
        ]

    def add(self, outputs: torch.Tensor, groups: list[int], labels: torch.Tensor) -> None:
        batch = labels.shape[0]
        if not self.stacked:
            for fused, group in zip(self.passes, groups):
                fused.add(outputs[group * batch : (group + 1) * batch], labels)
            return
        if groups != list(range(self.num_configs)):
            outputs = torch.cat([outputs[g * batch : (g + 1) * batch] for g in groups])
        logits = outputs.reshape(-1, outputs.size(-1)) if self.spec.task_type == "lm" else outputs
        if self.metrics is None:
            ignore_index = int(getattr(self.spec.criterion, "ignore_index", -100))
            self.metrics = StackedMetricsAccumulator(
                self.num_configs, logits.size(-1), logits.device, per_class=self.spec.per_class, ignore_index=ignore_index
            )
        self.metrics.update(logits, labels.reshape(-1))

    def read(self, train: _FusedPass | None, num_classes: int) -> tuple[list[MetricsResult | None], MetricsResult | None]:
        """Every configuration's results and the train pass's, from one device read (one
        all-reduce in a process group)."""
        if self.stacked:
            accumulators = self.metrics.accumulators if self.metrics is not None else [None] * self.num_configs
            entries = [(accumulator, self.spec.per_class and k == 0) for k, accumulator in enumerate(accumulators)]
        else:
            entries = [(p.accumulator, p.per_class) for p in self.passes]
        if train is not None:
            entries.append((train.accumulator, train.per_class))
        results = _read_accumulators(entries, num_classes)
        return results[: self.num_configs], (results[-1] if train is not None else None)


def _run_configurations_pass(model, loader, spec: _ValidationSpec, configurations: list[dict]) -> _ConfigurationsPass:
    configured = _ConfigurationsPass(spec, len(configurations))
    for batch in loader:
        inputs, labels = _to_device(batch, spec.device)
        outputs, groups = _forward_configurations(model, inputs, configurations)
        configured.add(outputs, groups, labels)
    return configured


def _attribution_result(real: MetricsResult | None, baseline: MetricsResult | None) -> AttributionResult:
    if real is None or baseline is None:
        return AttributionResult(0.0, 0.0, 0.0, 0.0, 0.0)  # an empty testloader, as the original
    real_accuracy, baseline_accuracy = float(real.accuracy), float(baseline.accuracy)
    return AttributionResult(
        real_accuracy=real_accuracy,
        baseline_accuracy=baseline_accuracy,
        seed_contribution=real_accuracy - baseline_accuracy,
        real_loss=float(real.loss),
        baseline_loss=float(baseline.loss),
    )


def _read(passes: list[_FusedPass], num_classes: int = 0) -> list[MetricsResult | None]:
    """:func:`_read_accumulators` of the passes' accumulators."""
    return _read_accumulators([(p.accumulator, p.per_class) for p in passes], num_classes)


def _read_accumulators(entries: list[tuple[MetricsAccumulator | None, bool]], num_classes: int = 0) -> list:
    """One device-to-host read for every (accumulator, per_class) that saw a batch (all on one
    device); None for one that saw none. In a process group of several ranks, the sums over
    every rank (one all-reduce, see :mod:`esper_fast.tolaria.distributed`); per-class counts
    for ``range(num_classes)``."""
    accumulators = [accumulator for accumulator, _ in entries]
    group = process_group()
    if group is not None:
        widths = [num_classes if per_class else 0 for _, per_class in entries]
        return reduce_results(accumulators, widths, group)
    results = iter(MetricsAccumulator.compute_all([a for a in accumulators if a is not None]))
    return [None if a is None else next(results) for a in accumulators]


# ---------------------------------------------------------------- validation: reference path


def _run_reference_pass(model, loader, spec: _ValidationSpec, per_class: bool) -> MetricsResult | None:
    """The original loop: criterion, argmax and bincounts per batch, one read per tensor at the end."""
    num_classes = spec.num_classes
    loss_sum = correct = class_total = class_correct = None
    total = batches = 0
    for batch in loader:
        inputs, labels = _to_device(batch, spec.device)
        outputs = model(inputs)
        loss = batch_loss_reference(outputs, labels, spec.criterion, spec.task_type)
        counts = batch_metrics_reference(outputs, labels, num_classes, per_class, spec.task_type)
        loss_sum = loss if loss_sum is None else loss_sum + loss
        correct = counts["correct"] if correct is None else correct + counts["correct"]
        total += counts["total"]
        batches += 1
        if per_class:
            bt, bc = counts["class_total"][:num_classes], counts["class_correct"][:num_classes]
            class_total = bt if class_total is None else class_total + bt
            class_correct = bc if class_correct is None else class_correct + bc
    if batches == 0:
        return None
    return MetricsResult(
        loss_sum=loss_sum.item(),
        batches=batches,
        correct=int(correct.item()),
        total=total,
        class_total=class_total.tolist() if per_class else None,
        class_correct=class_correct.tolist() if per_class else None,
    )


# ---------------------------------------------------------------- public validation API


def _grad_free(model: nn.Module):
    """inference_mode where no module of the model can keep a tensor made in it across
    calls (an inference tensor saved for backward later would fail); no_grad otherwise."""
    for module in model.modules():
        cls = type(module)
        known = cls.__module__.startswith(("torch.nn.", "esper_fast."))
        if not known or getattr(cls, "_keeps_tensors_across_calls", False):
            return torch.no_grad()
    return torch.inference_mode()


@contextlib.contextmanager
def _evaluating(model: nn.Module):
    """The block runs in eval mode without gradients; the model's train/eval mode comes back
    afterwards, even when the block raises."""
    was_training = model.training
    model.eval()
    try:
        with _grad_free(model):
            yield
    finally:
        model.train(was_training)


# The configurations the validation passes measure: the model as it is, the main slot's
# alpha forced to 0 (``force_alpha(0.0)`` on ``model.seed_slot``, as the original), or a
# mapping slot id -> forced alpha over ``model.seed_slots``.
AS_IS = "as_is"
BASELINE = "baseline"


def _slot_configuration(model, configuration) -> dict:
    if configuration == AS_IS:
        return {}
    if configuration == BASELINE:
        return {model.slot_id: 0.0}
    return dict(configuration)


def _configuration_key(slots, configuration: dict) -> tuple:
    return tuple(slot.configuration_key(configuration.get(slot_id)) for slot_id, slot in slots.items())


def _validation_results(
    model: nn.Module,
    testloader: BatchIterable,
    spec: _ValidationSpec,
    *,
    trainloader: BatchIterable | None = None,
    configurations=(AS_IS,),
) -> tuple[list[MetricsResult | None], MetricsResult | None]:
    """Each configuration's metrics over ``testloader`` (per-class counts, with
    ``spec.per_class``, for the first), and the metrics of the model as is over the first
    ``TRAIN_METRIC_BATCHES`` batches of ``trainloader`` (None without one). A result is None
    for a loader that yielded no batch. Call inside :func:`_evaluating`.

    ``AS_IS`` and ``BASELINE`` alone work with any model that has a ``seed_slot``: one pass
    over ``testloader`` for both (the host pass shared, see :func:`validate_with_attribution`)
    and one device read. Slot configurations (mappings) need ``model.seed_slots``: one pass,
    each segment of the host once per distinct configuration above it
    (:meth:`MorphogeneticModel.forward_configurations`); configurations with equal outputs
    are measured once. Under ``reference_mode()``: the original loops, one pass per
    configuration with the slots' alphas forced. The train iterator is made first, then
    the test passes run, then the train pass.
    """
    train_batches = None if trainloader is None else itertools.islice(trainloader, TRAIN_METRIC_BATCHES)
    if all(configuration in (AS_IS, BASELINE) for configuration in configurations):
        counterfactual = BASELINE in configurations
        real, train, baseline = _real_and_baseline(model, testloader, train_batches, spec, counterfactual)
        return [real if configuration == AS_IS else baseline for configuration in configurations], train
    slots = model.seed_slots
    requested = [_slot_configuration(model, configuration) for configuration in configurations]
    distinct: dict[tuple, int] = {}
    position = [distinct.setdefault(_configuration_key(slots, c), len(distinct)) for c in requested]
    measured = [requested[position.index(i)] for i in range(len(distinct))]
    if using_reference():
        results = []
        for i, configuration in enumerate(measured):
            with forced_alphas(slots, configuration):
                results.append(_run_reference_pass(model, testloader, spec, spec.per_class and i == 0))
        train = None if train_batches is None else _run_reference_pass(model, train_batches, spec, False)
    else:
        configured = _run_configurations_pass(model, testloader, spec, measured)
        train_pass = None if train_batches is None else _run_fused_pass(model, train_batches, spec, False)
        results, train = configured.read(train_pass, spec.num_classes or 0)
    return [results[i] for i in position], train


def _real_and_baseline(model, testloader, train_batches, spec: _ValidationSpec, counterfactual: bool):
    """``(real, train, baseline)`` of the model as is and with ``model.seed_slot``'s alpha at
    0 (None unless ``counterfactual``): the fused pass or the original loops."""
    if using_reference():
        real = _run_reference_pass(model, testloader, spec, spec.per_class)
        baseline = train = None
        if counterfactual:
            with model.seed_slot.force_alpha(0.0):
                baseline = _run_reference_pass(model, testloader, spec, False)
        if train_batches is not None:
            train = _run_reference_pass(model, train_batches, spec, False)
        return real, train, baseline
    if counterfactual:
        real_pass, baseline_pass = _run_attribution_pass(model, testloader, spec)
    else:
        real_pass, baseline_pass = _run_fused_pass(model, testloader, spec, spec.per_class), None
    train_pass = None if train_batches is None else _run_fused_pass(model, train_batches, spec, False)
    passes = [p for p in (real_pass, train_pass, baseline_pass) if p is not None]
    results = iter(_read(passes, spec.num_classes or 0))
    return tuple(None if p is None else next(results) for p in (real_pass, train_pass, baseline_pass))


def _per_class_accuracy(result: MetricsResult, num_classes: int) -> dict[int, float]:
    accuracy = {}
    for cls in range(num_classes):
        seen = result.class_total[cls] if cls < len(result.class_total) else 0
        hits = result.class_correct[cls] if cls < len(result.class_correct) else 0
        accuracy[cls] = 100.0 * hits / seen if seen else 0.0
    return accuracy


def validate_and_get_metrics(
    model: nn.Module,
    trainloader: BatchIterable,
    testloader: BatchIterable,
    criterion: nn.Module,
    device: str,
    compute_per_class: bool = False,
    num_classes: int = 10,
    task_type: str = "classification",
) -> tuple[float, float, float, float, dict[int, float] | None, float | None]:
    """Validation loss/accuracy, train loss/accuracy on the first 10 train batches, and extras.

    Runs in eval mode without gradients and leaves the model in the train/eval mode it found.
    ``val_loss`` is the sum of per-batch criterion values over the number of test batches;
    accuracies are percentages of ``argmax == labels`` (over ``labels.size(0)`` for
    classification, ``labels.numel()`` for lm). Counting is fused and stays on the device:
    one device-to-host read per call, none per batch. With the default ``nn.CrossEntropyLoss()``
    the kernel also computes the loss; any other criterion is evaluated per batch on device.

    Returns:
        ``(val_loss, val_accuracy, train_loss, train_accuracy, per_class_acc, perplexity)``:
        ``per_class_acc`` is ``{class: percent}`` for every class in ``range(num_classes)`` when
        ``compute_per_class`` (classification only), else None; ``perplexity`` is None for
        classification, ``exp(val_loss)`` for lm (``inf`` once ``val_loss >= 20``).
        Note: six positional values are already a lot; a dataclass return is the way to grow.

    Raises:
        ValueError: ``testloader`` or ``trainloader`` yields no batch, or a label is outside
            ``[0, C)`` (and not the criterion's ignore_index).
    """
    spec = _ValidationSpec(criterion, device, task_type, compute_per_class and task_type != "lm", num_classes)
    with _evaluating(model):
        (val,), train = _validation_results(model, testloader, spec, trainloader=trainloader)
    return _metrics_tuple(val, train, compute_per_class, num_classes, task_type)


def _metrics_tuple(val, train, compute_per_class: bool, num_classes: int, task_type: str) -> tuple:
    """``validate_and_get_metrics``'s six values from the two passes' results."""
    if val is None:
        raise ValueError("validate_and_get_metrics: testloader is empty; cannot compute validation metrics")
    if train is None:
        raise ValueError("validate_and_get_metrics: trainloader is empty; cannot compute training metrics")
    val_loss = float(val.loss)
    per_class_acc = None
    if compute_per_class:
        # lm counts nothing per class; the original still returns every class, at 0.0.
        per_class_acc = _per_class_accuracy(val, num_classes) if task_type != "lm" else dict.fromkeys(range(num_classes), 0.0)
    perplexity = None
    if task_type == "lm":
        perplexity = math.exp(val_loss) if val_loss < PERPLEXITY_LOSS_LIMIT else float("inf")
    return val_loss, float(val.accuracy), float(train.loss), float(train.accuracy), per_class_acc, perplexity


def validate_with_attribution(
    model: nn.Module,
    testloader: BatchIterable,
    criterion: nn.Module,
    device: str,
    task_type: str = "classification",
) -> AttributionResult:
    """Counterfactual validation: how much accuracy the seed adds over the host alone.

    The real forward (current alpha) against the host-only baseline (alpha forced to 0), in
    one pass over ``testloader`` with one device-to-host read. For esper_fast's
    MorphogeneticModel on a host that splits at its slots (CNNHost, TransformerHost, or a
    custom host that opts in, see :func:`esper_fast.kasmina.host.splits_at_slots`) each
    batch runs the host up to the slot once, the seed once and the rest of the host on both
    configurations batched together (2B rows; one forward when they coincide). Any other
    model (any ``seed_slot`` with a ``force_alpha(value)`` context manager works) runs the
    batch twice, the second time inside ``force_alpha(0.0)``. Accuracies are those of the
    two-pass original; alpha and the train/eval mode are restored even when a forward raises.
    An empty ``testloader`` gives an all-zero result (kept for compatibility).
    """
    spec = _ValidationSpec(criterion, device, task_type, per_class=False, num_classes=None)
    with _evaluating(model):
        (real, baseline), _ = _validation_results(model, testloader, spec, configurations=(AS_IS, BASELINE))
        if not using_reference():
            _draw_as_a_second_pass(testloader)
    return _attribution_result(real, baseline)


def _draw_as_a_second_pass(loader) -> None:
    """Draw from torch's RNG what the original's second pass over ``loader`` draws.

    The original iterates the test loader twice; a DataLoader draws a base seed from its
    generator (torch's global RNG when None) for each new iterator, and a shuffling sampler
    without a generator draws its seed when iterated. Drawing the same numbers keeps every
    later random number, hence the rest of the run, the original's. (Random draws made by
    the dataset itself while loading a test batch are not repeated.)
    """
    if not isinstance(loader, torch.utils.data.DataLoader):
        return
    if not (loader.persistent_workers and loader.num_workers > 0):
        torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
    try:
        next(iter(loader._index_sampler))
    except StopIteration:
        pass


def validate_epoch(
    model: nn.Module,
    trainloader: BatchIterable,
    testloader: BatchIterable,
    criterion: nn.Module,
    device: str,
    compute_per_class: bool = False,
    num_classes: int = 10,
    task_type: str = "classification",
    attribution: bool = True,
    *,
    exact_max_slots: int = 4,
    permutations: int = 16,
    generator: torch.Generator | None = None,
) -> EpochValidation:
    """``validate_and_get_metrics`` and ``validate_with_attribution`` from one pass over
    ``testloader``, with the attribution of every live slot.

    The validation metrics are those of the real (current-alpha) forward; the counterfactuals
    come from the same batches (the host pass shared, see :func:`validate_with_attribution`
    and :meth:`MorphogeneticModel.forward_configurations`). ``attribution`` is None when
    ``attribution=False`` or the model's ``seed_slot`` holds no seed (or there is no slot).
    ``slot_attribution`` (a :class:`SlotAttribution`, see :func:`slot_attribution` and the
    options ``exact_max_slots``, ``permutations`` and ``generator`` there) is None when
    ``attribution=False`` or no slot of ``model.seed_slots`` holds a live seed. A model with
    one live seed, in its main slot, measures the same two configurations as before, so every
    other field is what it was; with more, each distinct configuration the attribution needs
    is measured in the same pass. Leaves the model in the train/eval mode it found.

    Raises:
        ValueError: ``testloader`` or ``trainloader`` yields no batch, or a label is outside
            ``[0, C)`` (and not the criterion's ignore_index).
    """
    slot = getattr(model, "seed_slot", None)
    with_attribution = attribution and slot is not None and bool(getattr(slot, "is_active", False))
    plan = _slot_plan(model, exact_max_slots, permutations, generator) if attribution else None
    configurations = [AS_IS] + ([BASELINE] if with_attribution else [])
    subsets = _subset_configurations(model, plan, configurations) if plan is not None else {}
    spec = _ValidationSpec(criterion, device, task_type, compute_per_class and task_type != "lm", num_classes)
    with _evaluating(model):
        results, train = _validation_results(
            model, testloader, spec, trainloader=trainloader, configurations=configurations
        )
    val = results[0]
    metrics = _metrics_tuple(val, train, compute_per_class, num_classes, task_type)
    return EpochValidation(
        *metrics,
        attribution=_attribution_result(val, results[1]) if with_attribution else None,
        slot_attribution=None if plan is None else _slot_attribution(plan, subsets, results),
    )


def slot_attribution(
    model: nn.Module,
    testloader: BatchIterable,
    criterion: nn.Module,
    device: str,
    task_type: str = "classification",
    *,
    exact_max_slots: int = 4,
    permutations: int = 16,
    generator: torch.Generator | None = None,
) -> SlotAttribution:
    """Counterfactual attribution of every live slot of ``model`` over ``testloader``.

    ``f(T)`` is the accuracy (percent) or the mean batch loss of the model with the live
    seeds of ``T`` as they are and the other live seeds off (alpha forced to 0); slots
    without a live seed stay as they are. Per live slot: the Shapley value, exact over all
    2^S subsets when the S live seeds that can change the output number at most
    ``exact_max_slots``; above, estimated from ``permutations`` sampled orders in
    antithetic pairs (each order followed by its reverse; ``torch.randperm`` on
    ``generator``, default a fresh generator seeded with 0) with a 95% error bound
    (Student's t over the pairs' samples). Every sampled order's subsets are measured
    exactly. Also, exact in both cases: the leave-one-out and alone-on contributions and
    every pair's interaction (see :mod:`esper_fast.tolaria.attribution`).

    One pass over ``testloader``; each batch walks the host once (each segment once per
    distinct configuration of the slots above it). ``model`` needs ``seed_slots``
    (esper_fast's :class:`MorphogeneticModel`). Leaves the model's mode and alphas as found.

    Raises:
        ValueError: ``testloader`` yields no batch, or a label is outside ``[0, C)``.
        TypeError: the model has no ``seed_slots``.
    """
    if getattr(model, "seed_slots", None) is None:
        raise TypeError("slot_attribution: the model has no seed_slots (esper_fast's MorphogeneticModel has)")
    plan = _slot_plan(model, exact_max_slots, permutations, generator)
    if plan is None:
        plan = plan_attribution((), ())
    configurations = [AS_IS]
    subsets = _subset_configurations(model, plan, configurations)
    spec = _ValidationSpec(criterion, device, task_type, per_class=False, num_classes=None)
    with _evaluating(model):
        results, _ = _validation_results(model, testloader, spec, configurations=configurations)
    if results[0] is None:
        raise ValueError("slot_attribution: testloader is empty; cannot measure the configurations")
    return _slot_attribution(plan, subsets, results)


def _slot_plan(model, exact_max_slots: int, permutations: int, generator) -> AttributionPlan | None:
    """The attribution plan of the model's live slots (None: no ``seed_slots`` or no live seed)."""
    slots = getattr(model, "seed_slots", None)
    if slots is None:
        return None
    live = [slot_id for slot_id, slot in slots.items() if slot.is_live]
    if not live:
        return None
    # A seed whose forced-off output is its current one changes nothing: Shapley value 0.
    players = [s for s in live if slots[s].configuration_key(None) != slots[s].configuration_key(0.0)]
    return plan_attribution(
        live, players, exact_max_slots=exact_max_slots, permutations=permutations, generator=generator
    )


def _subset_configurations(model, plan: AttributionPlan, configurations: list) -> dict[frozenset, int]:
    """Append the configuration of each subset of ``plan`` to ``configurations`` (the live
    players outside the subset off) unless one already there gives the same output; return
    each subset's position in ``configurations``."""
    slots = model.seed_slots
    keys = [_configuration_key(slots, _slot_configuration(model, c)) for c in configurations]
    positions = {}
    for subset in plan.subsets:
        configuration = {p: 0.0 for p in plan.players if p not in subset}
        key = _configuration_key(slots, configuration)
        if key not in keys:
            keys.append(key)
            configurations.append(configuration)
        positions[subset] = keys.index(key)
    return positions


def _slot_attribution(plan: AttributionPlan, subsets: dict[frozenset, int], results: list) -> SlotAttribution:
    accuracy = {subset: float(results[i].accuracy) for subset, i in subsets.items()}
    loss = {subset: float(results[i].loss) for subset, i in subsets.items()}
    return attribute(plan, accuracy, loss)
