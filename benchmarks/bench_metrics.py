"""Validation metrics: the original per-batch loop vs the fused accumulator.

reference: per batch the criterion, ``max``/``argmax``, a compare and sum, and with per-class on
two ``torch.bincount`` (the second on a boolean-mask index), then one ``.item()`` per result.
fast: ``MetricsAccumulator.update`` per batch (one kernel) and one ``compute()``.
The stacked cases time K configurations stacked along the batch: K single-op calls per batch
(reference) against one ``StackedMetricsAccumulator.update`` per batch (fast).

Run: ``python -m pytest benchmarks/bench_metrics.py --benchmark-only``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from common import Case, bench_params, run_case
from esper_fast.ops import MetricsAccumulator, StackedMetricsAccumulator
from esper_fast.ops.reference import batch_loss_reference, batch_metrics_reference

# Rounds on CPU for the 8192 x 50257 cases (one reference call takes seconds there).
CPU_ROUNDS_LM = 2


def _make_setup(batches, rows, classes, dtype, per_class):
    def setup(device):
        g = torch.Generator(device="cpu").manual_seed(0)
        data = []
        for _ in range(batches):
            logits = (torch.randn(rows, classes, generator=g) * 2).to(device=device, dtype=dtype)
            targets = torch.randint(0, classes, (rows,), generator=g).to(device)
            data.append((logits, targets))
        return {
            "batches": data,
            "classes": classes,
            "per_class": per_class,
            "device": device,
            "criterion": nn.CrossEntropyLoss(),
        }

    return setup


def reference_pass(state):
    """The original validation loop over already computed logits."""
    criterion, classes, per_class = state["criterion"], state["classes"], state["per_class"]
    loss_sum = correct = class_total = class_correct = None
    total = 0
    for logits, targets in state["batches"]:
        loss = batch_loss_reference(logits, targets, criterion, "classification")
        counts = batch_metrics_reference(logits, targets, classes, per_class)
        loss_sum = loss if loss_sum is None else loss_sum + loss
        correct = counts["correct"] if correct is None else correct + counts["correct"]
        total += counts["total"]
        if per_class:
            bt, bc = counts["class_total"], counts["class_correct"]
            class_total = bt if class_total is None else class_total + bt
            class_correct = bc if class_correct is None else class_correct + bc
    result = (loss_sum.item() / len(state["batches"]), 100.0 * correct.item() / total)
    if per_class:
        result += (class_total.tolist(), class_correct.tolist())
    return result


def fast_pass(state):
    acc = MetricsAccumulator(state["classes"], state["device"], per_class=state["per_class"])
    for logits, targets in state["batches"]:
        acc.update(logits, targets)
    result = acc.compute()
    return result.loss, result.accuracy, result.class_total, result.class_correct


def _logit_bytes(state):
    return sum(x.numel() * x.element_size() + t.numel() * t.element_size() for x, t in state["batches"])


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _case(name, batches, rows, classes, dtype, per_class, goal):
    dtype_name = _DTYPE_NAMES[dtype]
    return Case(
        family="metrics",
        name=f"{name} {batches}x[{rows}x{classes}] {dtype_name}{' per-class' if per_class else ''}",
        setup=_make_setup(batches, rows, classes, dtype, per_class),
        reference=reference_pass,
        fast=fast_pass,
        bytes_moved=_logit_bytes,  # one read of the logits (and targets) is the floor
        goal=goal,
        params={
            "batches": batches,
            "rows": rows,
            "classes": classes,
            "dtype": dtype_name,
            "per_class": per_class,
            "numel": batches * rows * classes,
        },
    )


CASES = [
    _case("classification", 40, 128, 10, torch.float32, True, "cpu >= 2x, cuda >= 5x"),
    _case("classification", 20, 256, 1000, torch.float32, True, "faster than reference"),
    _case("lm", 1, 8192, 50257, torch.float32, False, "cpu >= 2x, cuda >= 3x and >= 80% of one-read bandwidth"),
    _case("lm", 1, 8192, 50257, torch.bfloat16, False, "cpu >= 2x, cuda >= 3x and >= 80% of one-read bandwidth"),
]


# K configurations stacked along the batch (logits [K * N, C], targets [N]): K calls of the single
# op per batch on each configuration's rows, then one read of the K accumulators, against one
# stacked call per batch and one read.
def _make_stacked_setup(configs, batches, rows, classes, dtype):
    def setup(device):
        g = torch.Generator(device="cpu").manual_seed(0)
        data = []
        for _ in range(batches):
            logits = (torch.randn(configs * rows, classes, generator=g) * 2).to(device=device, dtype=dtype)
            targets = torch.randint(0, classes, (rows,), generator=g).to(device)
            data.append((logits, targets))
        return {"batches": data, "configs": configs, "rows": rows, "classes": classes, "device": device}

    return setup


def separate_configs_pass(state):
    configs, rows = state["configs"], state["rows"]
    accumulators = [MetricsAccumulator(state["classes"], state["device"]) for _ in range(configs)]
    for logits, targets in state["batches"]:
        for k, acc in enumerate(accumulators):
            acc.update(logits[k * rows : (k + 1) * rows], targets)
    return [(r.loss, r.accuracy) for r in MetricsAccumulator.compute_all(accumulators)]


def stacked_configs_pass(state):
    acc = StackedMetricsAccumulator(state["configs"], state["classes"], state["device"])
    for logits, targets in state["batches"]:
        acc.update(logits, targets)
    return [(r.loss, r.accuracy) for r in acc.compute()]


def _stacked_case(name, configs, batches, rows, classes, dtype, goal, devices=("cpu", "cuda")):
    dtype_name = _DTYPE_NAMES[dtype]
    return Case(
        family="metrics",
        name=f"{name} {configs} configs {batches}x[{configs}x{rows}x{classes}] {dtype_name}",
        setup=_make_stacked_setup(configs, batches, rows, classes, dtype),
        reference=separate_configs_pass,
        fast=stacked_configs_pass,
        bytes_moved=_logit_bytes,  # one read of every configuration's logits (and the targets)
        devices=devices,
        goal=goal,
        params={
            "configs": configs,
            "batches": batches,
            "rows": rows,
            "classes": classes,
            "dtype": dtype_name,
            "per_class": False,
            "numel": configs * batches * rows * classes,
        },
    )


CASES.append(_stacked_case("stacked classification", 4, 40, 128, 10, torch.float32,
                           "faster than 4 single-op calls per batch"))
CASES.append(_stacked_case("stacked lm", 8, 1, 1024, 50257, torch.float32,
                           "as fast as 8 single-op calls; cuda >= 80% of one-read bandwidth"))


@pytest.mark.parametrize("case,device,impl", bench_params(CASES))
def test_metrics(benchmark, case, device, impl):
    rounds = CPU_ROUNDS_LM if device == "cpu" and case.params["classes"] >= 50257 else None
    run_case(benchmark, case, device, impl, rounds=rounds)
