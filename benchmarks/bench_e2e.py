"""End to end: one epoch of the cifar10 task with a BLENDING seed, fused vs the original.

One "epoch" is what ``esper-fast train`` does per epoch while a seed blends:
``train_epoch_blended`` over the train batches, ``validate_and_get_metrics`` with per-class
accuracy, ``validate_with_attribution`` (real and alpha = 0 passes) and a governor
``snapshot()``. The batches already sit on the device, so the data loader does not hide the
kernels. reference: the same calls inside :func:`esper_fast.ops.reference_mode` (composite
blend, per-batch metrics with bincount, per-tensor snapshot); fast: the kernels.

Both sides train the model they time, so their weights drift apart over the rounds; the work
per epoch does not depend on the weights.

Run: ``python -m pytest benchmarks/bench_e2e.py --benchmark-only``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from common import Case, bench_params, run_case
from esper_fast.train.datasets import ImageBatches, synthetic_images
from esper_fast.kasmina import QualityGates, SeedStage
from esper_fast.ops import reference_mode
from esper_fast.tolaria import (
    TolariaGovernor,
    create_model,
    train_epoch_blended,
    validate_and_get_metrics,
    validate_with_attribution,
)

# Sizes per device: a CPU round stays near a second on 2 cores; CUDA runs a real epoch's
# worth of steps at the batch size the task uses.
SIZES = {"cpu": {"train_batches": 16, "test_batches": 8, "batch": 128},
         "cuda": {"train_batches": 100, "test_batches": 40, "batch": 128}}
CPU_ROUNDS = 5


def _batches(count: int, batch: int, seed: int, device: str):
    images = ImageBatches(*synthetic_images(count * batch, seed=seed))
    return [
        tuple(t.to(device) for t in images[list(range(i * batch, (i + 1) * batch))])
        for i in range(count)
    ]


def setup(device: str):
    sizes = SIZES["cuda" if device.startswith("cuda") else "cpu"]
    torch.manual_seed(0)
    model = create_model("cifar10", device)
    model.germinate_seed("conv_light", "bench-seed")
    slot = model.seed_slot
    # Straight to BLENDING: no improvement, age or gradient activity needed.
    slot.gates = QualityGates(min_training_improvement=-100.0, min_seed_gradient_ratio=0.0, min_training_epochs=0)
    slot.advance_stage(SeedStage.TRAINING)
    slot.advance_stage(SeedStage.BLENDING)
    assert slot.state.stage == SeedStage.BLENDING
    slot.set_alpha(0.5)
    host = torch.optim.SGD(model.get_host_parameters(), lr=0.01, momentum=0.9)
    seed = torch.optim.SGD(model.get_seed_parameters(), lr=0.01, momentum=0.9)
    return {
        "model": model,
        "train": _batches(sizes["train_batches"], sizes["batch"], seed=1, device=device),
        "test": _batches(sizes["test_batches"], sizes["batch"], seed=2, device=device),
        "criterion": nn.CrossEntropyLoss(),
        "host_optimizer": host,
        "seed_optimizer": seed,
        "governor": TolariaGovernor(model),
        "device": device,
    }


def blending_epoch(state):
    model, criterion, device = state["model"], state["criterion"], state["device"]
    train_epoch_blended(model, state["train"], criterion, state["host_optimizer"], state["seed_optimizer"], device)
    metrics = validate_and_get_metrics(
        model, state["train"], state["test"], criterion, device, compute_per_class=True, num_classes=10
    )
    attribution = validate_with_attribution(model, state["test"], criterion, device)
    state["governor"].snapshot()
    return metrics, attribution


def reference_epoch(state):
    with reference_mode():
        return blending_epoch(state)


CASES = [
    Case(
        family="e2e",
        name="e2e cifar10 blending epoch",
        setup=setup,
        reference=reference_epoch,
        fast=blending_epoch,
        goal="cpu >= 1.2x, cuda >= 1.5x",
        params={"task": "cifar10", "blueprint": "conv_light", "alpha": 0.5, "sizes": SIZES},
    ),
]


@pytest.mark.parametrize("case,device,impl", bench_params(CASES))
def test_e2e(benchmark, case, device, impl):
    run_case(benchmark, case, device, impl, rounds=CPU_ROUNDS if device == "cpu" else None)
