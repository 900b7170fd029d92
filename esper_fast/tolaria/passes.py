"""The validation passes: one pass over a loader measuring the model's metrics, on the fused
metrics kernel (:class:`esper_fast.ops.MetricsAccumulator`, no device-to-host synchronisation
per batch, one read per call) or, under ``reference_mode()``, by the original's loop.

A pass measures K configurations of the model's slots at once
(:class:`ConfigurationsPass`): their outputs stacked along the batch go to one
:class:`~esper_fast.ops.StackedMetricsAccumulator` (one launch per batch for all K), or to one
accumulator each with a custom criterion or a single configuration. :func:`read_accumulators`
is the one read (one all-reduce in a process group, :mod:`esper_fast.tolaria.distributed`).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from esper_fast.kasmina.configurations import forward_each_configuration
from esper_fast.ops.metrics import MetricsAccumulator, MetricsResult, StackedMetricsAccumulator
from esper_fast.ops.reference import batch_loss_reference, batch_metrics_reference
from esper_fast.tolaria.batches import Batch, compute_loss, to_device
from esper_fast.tolaria.distributed import process_group, reduce_results

__all__ = [
    "ValidationSpec",
    "FusedPass",
    "ConfigurationsPass",
    "run_fused_pass",
    "run_configurations_pass",
    "run_reference_pass",
    "read_accumulators",
    "evaluating",
    "grad_free",
    "shares_the_host_pass",
    "per_class_accuracy",
]

def kernel_computes_loss(criterion: nn.Module) -> bool:
    """True when the criterion is exactly the default cross-entropy the kernel reproduces."""
    return (
        type(criterion) is nn.CrossEntropyLoss
        and criterion.weight is None
        and criterion.reduction == "mean"
        and criterion.label_smoothing == 0.0
    )


def logits_and_targets(outputs: torch.Tensor, labels: torch.Tensor, task_type: str) -> Batch:
    if task_type == "lm":
        return outputs.reshape(-1, outputs.size(-1)), labels.reshape(-1)
    return outputs, labels


@dataclasses.dataclass(frozen=True)
class ValidationSpec:
    """How a validation call measures: the loss, where batches go, and per-class counting
    (of the real configuration only; ``num_classes`` sizes it)."""

    criterion: nn.Module
    device: str
    task_type: str
    per_class: bool
    num_classes: int | None


class FusedPass:
    """One validation pass's metrics; the accumulator is made at the first batch (C is known then)."""

    def __init__(self, criterion: nn.Module, task_type: str, per_class: bool):
        self.criterion = criterion
        self.task_type = task_type
        self.per_class = per_class
        self.kernel_loss = kernel_computes_loss(criterion)
        self.ignore_index = int(getattr(criterion, "ignore_index", -100))
        self.accumulator: MetricsAccumulator | None = None

    def add(self, outputs: torch.Tensor, labels: torch.Tensor) -> None:
        logits, targets = logits_and_targets(outputs, labels, self.task_type)
        if self.accumulator is None:
            self.accumulator = MetricsAccumulator(
                logits.size(-1), logits.device, per_class=self.per_class, ignore_index=self.ignore_index
            )
        loss = None if self.kernel_loss else compute_loss(outputs, labels, self.criterion, self.task_type)
        self.accumulator.update(logits, targets, loss)


def run_fused_pass(model, loader, spec: ValidationSpec, per_class: bool) -> FusedPass:
    fused = FusedPass(spec.criterion, spec.task_type, per_class)
    for batch in loader:
        inputs, labels = to_device(batch, spec.device)
        fused.add(model(inputs), labels)
    return fused


def shares_the_host_pass(model: nn.Module) -> bool:
    # Only a model whose own class offers the shared walk (not one reached through a
    # wrapper's __getattr__, such as torch.compile's or DDP's, whose forward differs).
    return callable(getattr(type(model), "forward_configurations_stacked", None))


def forward_configurations(model, inputs: torch.Tensor, configurations: list[dict], slots) -> tuple[torch.Tensor, list[int]]:
    """The outputs of every configuration stacked along the batch, and each one's row group:
    the model's shared walk (:meth:`MorphogeneticModel.forward_configurations_stacked`), or
    for any other model one forward per configuration with the alphas of ``slots`` forced.
    ``configurations`` None: the model as it is, by its own forward."""
    if configurations is None:
        return model(inputs), [0]
    if shares_the_host_pass(model):
        return model.forward_configurations_stacked(inputs, configurations)
    outputs = forward_each_configuration(model, inputs, slots, configurations)
    return torch.cat(outputs), list(range(len(outputs)))


class ConfigurationsPass:
    """One validation pass's metrics of K configurations of the model, from their outputs
    stacked along the batch; per-class counts (with ``spec.per_class``) are read for the first.

    With ``stack`` and the criterion the kernel computes, the stacked logits go to one
    :class:`StackedMetricsAccumulator` (one kernel launch per batch for all K); otherwise
    each configuration has its own :class:`FusedPass` (which evaluates a custom criterion).
    """

    def __init__(self, spec: ValidationSpec, num_configs: int, stack: bool = True):
        self.spec = spec
        self.num_configs = num_configs
        self.stacked = stack and kernel_computes_loss(spec.criterion)
        self.metrics: StackedMetricsAccumulator | None = None
        self.passes = [] if self.stacked else [
            FusedPass(spec.criterion, spec.task_type, per_class=spec.per_class and k == 0) for k in range(num_configs)
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

    def read(self, train: FusedPass | None, num_classes: int) -> tuple[list[MetricsResult | None], MetricsResult | None]:
        """Every configuration's results and the train pass's, from one device read (one
        all-reduce in a process group)."""
        if self.stacked:
            accumulators = self.metrics.accumulators if self.metrics is not None else [None] * self.num_configs
            entries = [(accumulator, self.spec.per_class and k == 0) for k, accumulator in enumerate(accumulators)]
        else:
            entries = [(p.accumulator, p.per_class) for p in self.passes]
        if train is not None:
            entries.append((train.accumulator, train.per_class))
        results = read_accumulators(entries, num_classes)
        return results[: self.num_configs], (results[-1] if train is not None else None)


def run_configurations_pass(
    model, loader, spec: ValidationSpec, configurations: list[dict] | None, slots, stack: bool = True
) -> ConfigurationsPass:
    """The metrics of each configuration (slot id -> forced alpha over ``slots``) over
    ``loader`` (see :class:`ConfigurationsPass` for ``stack``); ``configurations`` None: of
    the model as it is, by its own forward."""
    configured = ConfigurationsPass(spec, 1 if configurations is None else len(configurations), stack)
    for batch in loader:
        inputs, labels = to_device(batch, spec.device)
        outputs, groups = forward_configurations(model, inputs, configurations, slots)
        configured.add(outputs, groups, labels)
    return configured


def read_accumulators(entries: list[tuple[MetricsAccumulator | None, bool]], num_classes: int = 0) -> list:
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


def run_reference_pass(model, loader, spec: ValidationSpec, per_class: bool) -> MetricsResult | None:
    """The original loop: criterion, argmax and bincounts per batch, one read per tensor at the end."""
    num_classes = spec.num_classes
    loss_sum = correct = class_total = class_correct = None
    total = batches = 0
    for batch in loader:
        inputs, labels = to_device(batch, spec.device)
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


def grad_free(model: nn.Module):
    """inference_mode where no module of the model can keep a tensor made in it across
    calls (an inference tensor saved for backward later would fail); no_grad otherwise."""
    for module in model.modules():
        cls = type(module)
        known = cls.__module__.startswith(("torch.nn.", "esper_fast."))
        if not known or getattr(cls, "_keeps_tensors_across_calls", False):
            return torch.no_grad()
    return torch.inference_mode()


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """The block runs in eval mode without gradients; the model's train/eval mode comes back
    afterwards, even when the block raises."""
    was_training = model.training
    model.eval()
    try:
        with grad_free(model):
            yield
    finally:
        model.train(was_training)


def per_class_accuracy(result: MetricsResult, num_classes: int) -> dict[int, float]:
    accuracy = {}
    for cls in range(num_classes):
        seen = result.class_total[cls] if cls < len(result.class_total) else 0
        hits = result.class_correct[cls] if cls < len(result.class_correct) else 0
        accuracy[cls] = 100.0 * hits / seen if seen else 0.0
    return accuracy
