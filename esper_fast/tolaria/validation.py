"""Validation: the model's metrics, the counterfactual of its main slot and the attribution
of every live seed, from one pass over the test set.

One engine (:func:`measure`) measures any list of configurations of the model's slots
(slot id -> forced alpha, :mod:`esper_fast.kasmina.configurations`) in one pass with one
device read: the model as it is (:data:`AS_IS`), the main slot off (:data:`BASELINE`, the
original's second pass) and the subsets an attribution plan asks for
(:mod:`esper_fast.tolaria.attribution`). Configurations with equal keys are measured once;
an esper_fast model walks its host once per batch for all of them. Under
``esper_fast.ops.reference_mode()`` each configuration gets the original's own loop instead,
which the benchmarks time against. The passes themselves are :mod:`esper_fast.tolaria.passes`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch
from torch import nn

from esper_fast.kasmina.configurations import configuration_key, forced_alphas
from esper_fast.ops.metrics import MetricsResult
from esper_fast.ops.mode import using_reference
from esper_fast.tolaria.attribution import (
    SlotAttribution,
    attribution_of,
    plan_attribution,
    plan_for_slots,
    subset_configurations,
)
from esper_fast.tolaria.batches import BatchIterable
from esper_fast.tolaria.passes import (
    ValidationSpec,
    evaluating,
    per_class_accuracy,
    run_configurations_pass,
    run_fused_pass,
    run_reference_pass,
)

__all__ = [
    "AttributionResult",
    "EpochValidation",
    "validate_and_get_metrics",
    "validate_with_attribution",
    "validate_epoch",
    "slot_attribution",
    "AS_IS",
    "BASELINE",
    "measure",
]

# Train metrics look at no more than this many batches of the train loader.
TRAIN_METRIC_BATCHES = 10
# Perplexity is reported as inf from this validation loss up (exp would overflow soon after).
PERPLEXITY_LOSS_LIMIT = 20.0

# The configurations of the original's two passes: the model as it is, and the main slot's
# alpha forced to 0 (``force_alpha(0.0)`` on ``model.seed_slot``).
AS_IS = "as_is"
BASELINE = "baseline"
# The key of the main slot of a model that has only ``seed_slot`` (the original's, say).
_MAIN = "seed_slot"


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


# ---------------------------------------------------------------- the public passes


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
    spec = ValidationSpec(criterion, device, task_type, compute_per_class and task_type != "lm", num_classes)
    with evaluating(model):
        (val,), train = measure(model, testloader, spec, trainloader=trainloader)
    return _metrics_tuple(val, train, compute_per_class, num_classes, task_type)


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
    custom host that opts in, see :func:`esper_fast.kasmina.segments.splits_at_slots`) each
    batch runs the host up to the slot once, the seed once and the rest of the host on both
    configurations batched together (2B rows; one forward when they coincide). Any other
    model (any ``seed_slot`` with a ``force_alpha(value)`` context manager works) runs the
    batch twice, the second time inside ``force_alpha(0.0)``. Accuracies are those of the
    two-pass original; alpha and the train/eval mode are restored even when a forward raises.
    An empty ``testloader`` gives an all-zero result (kept for compatibility).
    """
    spec = ValidationSpec(criterion, device, task_type, per_class=False, num_classes=None)
    with evaluating(model):
        (real, baseline), _ = measure(model, testloader, spec, configurations=(AS_IS, BASELINE))
        if not using_reference():
            _draw_as_a_second_pass(testloader)
    return _attribution_result(real, baseline)


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
    plan = plan_for_slots(getattr(model, "seed_slots", None), exact_max_slots, permutations, generator) if attribution else None
    configurations = [AS_IS] + ([BASELINE] if with_attribution else [])
    subsets, added = _add_subsets(model, plan, configurations) if plan is not None else ({}, [])
    spec = ValidationSpec(criterion, device, task_type, compute_per_class and task_type != "lm", num_classes)
    with evaluating(model):
        results, train = measure(
            model, testloader, spec, trainloader=trainloader, configurations=configurations, original_passes=not added
        )
    val = results[0]
    metrics = _metrics_tuple(val, train, compute_per_class, num_classes, task_type)
    return EpochValidation(
        *metrics,
        attribution=_attribution_result(val, results[1]) if with_attribution else None,
        slot_attribution=None if plan is None else attribution_of(plan, subsets, results),
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
    plan = plan_for_slots(model.seed_slots, exact_max_slots, permutations, generator) or plan_attribution((), ())
    configurations = [AS_IS]
    subsets, added = _add_subsets(model, plan, configurations)
    spec = ValidationSpec(criterion, device, task_type, per_class=False, num_classes=None)
    with evaluating(model):
        results, _ = measure(model, testloader, spec, configurations=configurations, original_passes=not added)
    if results[0] is None:
        raise ValueError("slot_attribution: testloader is empty; cannot measure the configurations")
    return attribution_of(plan, subsets, results)


def _add_subsets(model, plan, configurations: list) -> tuple[dict[frozenset, int], list[dict]]:
    """Append to ``configurations`` those of ``plan``'s subsets that none there measures
    already; return each subset's position and the appended configurations."""
    keyed, _ = _slots_of(model)
    resolved = [_resolved(model, configuration, keyed) for configuration in configurations]
    subsets, added = subset_configurations(keyed, plan, resolved)
    configurations.extend(added)
    return subsets, added


# ---------------------------------------------------------------- the engine


def _slots_of(model) -> tuple[dict | None, dict]:
    """``(keyed, slots)``: the model's ``seed_slots`` (None when it has none, so its
    configurations have no keys) and the slots a configuration may force (a model with only
    ``seed_slot`` offers that one, as :data:`_MAIN`)."""
    slots = getattr(model, "seed_slots", None)
    if slots is not None:
        return slots, slots
    slot = getattr(model, "seed_slot", None)
    return None, ({_MAIN: slot} if slot is not None else {})


def _resolved(model, configuration, keyed) -> dict:
    if configuration == AS_IS:
        return {}
    if configuration == BASELINE:
        return {model.slot_id if keyed is not None else _MAIN: 0.0}
    return dict(configuration)


def measure(
    model: nn.Module,
    testloader: BatchIterable,
    spec: ValidationSpec,
    *,
    trainloader: BatchIterable | None = None,
    configurations=(AS_IS,),
    original_passes: bool = True,
) -> tuple[list[MetricsResult | None], MetricsResult | None]:
    """Each configuration's metrics over ``testloader`` (per-class counts, with
    ``spec.per_class``, for the first) and the metrics of the model as is over the first
    ``TRAIN_METRIC_BATCHES`` batches of ``trainloader`` (None without one). A result is None
    for a loader that yielded no batch. Call inside :func:`~esper_fast.tolaria.passes.evaluating`.

    ``configurations``: :data:`AS_IS`, :data:`BASELINE` (any model with a ``seed_slot``) or
    mappings slot id -> forced alpha over ``model.seed_slots``. One pass over ``testloader``
    and one device read for all of them; configurations with equal keys are measured once.
    Under ``reference_mode()``: the original loops, one pass per configuration with the
    slots' alphas forced. ``original_passes``: the configurations are the original's (as is,
    main slot off), measured as the original does, each by its own accumulator (under
    ``reference_mode()`` by its own pass); otherwise they share one stacked accumulator.
    The train iterator is made first, then the test passes run, then the train pass.
    """
    train_batches = None if trainloader is None else itertools.islice(trainloader, TRAIN_METRIC_BATCHES)
    keyed, slots = _slots_of(model)
    requested = [_resolved(model, configuration, keyed) for configuration in configurations]
    if keyed is not None and not (original_passes and using_reference()):
        distinct: dict[tuple, int] = {}
        position = [distinct.setdefault(configuration_key(keyed, c), len(distinct)) for c in requested]
    else:
        position = list(range(len(requested)))
    measured = [requested[position.index(i)] for i in range(max(position) + 1)]
    if using_reference():
        results = []
        for i, configuration in enumerate(measured):
            with forced_alphas(slots, configuration):
                results.append(run_reference_pass(model, testloader, spec, spec.per_class and i == 0))
        train = None if train_batches is None else run_reference_pass(model, train_batches, spec, False)
    else:
        as_is_alone = requested == [{}]  # what was asked, not what equal keys left: the model's own forward
        configured = run_configurations_pass(
            model, testloader, spec, None if as_is_alone else measured, slots, stack=not original_passes
        )
        train_pass = None if train_batches is None else run_fused_pass(model, train_batches, spec, False)
        results, train = configured.read(train_pass, spec.num_classes or 0)
    return [results[i] for i in position], train


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
        per_class_acc = per_class_accuracy(val, num_classes) if task_type != "lm" else dict.fromkeys(range(num_classes), 0.0)
    perplexity = None
    if task_type == "lm":
        perplexity = math.exp(val_loss) if val_loss < PERPLEXITY_LOSS_LIMIT else float("inf")
    return val_loss, float(val.accuracy), float(train.loss), float(train.accuracy), per_class_acc, perplexity


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
