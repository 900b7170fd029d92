"""Validation with counterfactual attribution, and whole epochs, fused vs the original.

The cifar10 task model with a conv_light seed BLENDING at ``block2_post`` (alpha 0.5), batch
128, 8 train + 8 test batches already on the device; the tinystories task model (full size,
short sequences on CPU) with a lora seed BLENDING at the middle layer.

- ``attribution``: ``validate_with_attribution``. Original: two full passes, the second
  inside ``force_alpha(0)``. Fast: one pass; per batch the host up to the slot and the seed
  run once and the rest of the host runs on both configurations (2B rows).
- ``validate_epoch``: esper_fast's ``validate_epoch`` against the original's two calls
  ``validate_and_get_metrics`` + ``validate_with_attribution`` (three passes over the test set).
- ``epoch``: ``train_epoch_blended`` + ``validate_epoch`` + governor ``snapshot()`` against
  the original's epoch (its two validation calls). The drop-in epoch, the original's calls
  on both sides, is ``bench_e2e.py``.

reference: the same calls inside :func:`esper_fast.ops.reference_mode` (the original
algorithms: composite blend, per-batch metrics, two attribution passes, per-tensor snapshot).
floor: the work no implementation can skip, timed in the same run from the model's own
pieces (the prefix and the seed once, the suffix on both configurations, the train pass).

Run: ``python -m pytest benchmarks/bench_validation.py -o python_files="bench_*.py" --benchmark-only``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn

from common import Case, bench_params, run_case
from esper_fast.kasmina import SeedStage
from esper_fast.ops import reference_mode
from esper_fast.tolaria import (
    TolariaGovernor,
    create_model,
    train_epoch_blended,
    validate_and_get_metrics,
    validate_epoch,
    validate_with_attribution,
)

CPU_ROUNDS = 7
SIZES = {
    "cifar10": {"cpu": {"train": 8, "test": 8, "batch": 128}, "cuda": {"train": 100, "test": 40, "batch": 128}},
    "tinystories": {"cpu": {"train": 2, "test": 2, "batch": 4, "seq": 64}, "cuda": {"train": 20, "test": 10, "batch": 32, "seq": 256}},
}


def _sizes(task: str, device: str) -> dict:
    return SIZES[task]["cuda" if device.startswith("cuda") else "cpu"]


def blending_model(create_model, stages, task: str, device: str, blueprint: str, slot_id: str | None = None):
    """The task's model (from ``create_model``: esper_fast's or the original's) with a seed
    BLENDING at alpha 0.5 in slot ``slot_id`` (default: the preset's, the first)."""
    torch.manual_seed(0)
    model = create_model(task, device)
    if slot_id is not None and slot_id != model.slot_id:
        # The preset puts the slot at the first injection point; move it for this bench.
        host = model.host
        host.unregister_slot(model.slot_id)
        model.slot_id = model.seed_slot.slot_id = slot_id
        model.seed_slot.channels = host.injection_points[slot_id]
        host.register_slot(slot_id, model.seed_slot)
    model.germinate_seed(blueprint, "bench-seed")
    model.seed_slot.state.transition(stages.TRAINING)
    model.seed_slot.state.transition(stages.BLENDING)
    model.seed_slot.set_alpha(0.5)
    if blueprint == "lora":
        nn.init.normal_(model.seed_slot.seed.up.weight, std=0.02)  # a seed that changes the output
    return model


def _blending_model(task: str, device: str, blueprint: str, slot_id: str | None = None):
    return blending_model(create_model, SeedStage, task, device, blueprint, slot_id)


def _cifar10_setup(device: str):
    sizes = _sizes("cifar10", device)
    model = _blending_model("cifar10", device, "conv_light")
    g = torch.Generator().manual_seed(1)

    def batches(n):
        return [(torch.randn(sizes["batch"], 3, 32, 32, generator=g).to(device),
                 torch.randint(0, 10, (sizes["batch"],), generator=g).to(device)) for _ in range(n)]

    return _state(model, batches(sizes["train"]), batches(sizes["test"]), device, "classification")


def _tinystories_setup(device: str):
    sizes = _sizes("tinystories", device)
    model = _blending_model("tinystories", device, "lora", slot_id="layer_2_post_block")
    g = torch.Generator().manual_seed(1)

    def batches(n):
        shape = (sizes["batch"], sizes["seq"])
        return [(torch.randint(0, 50257, shape, generator=g).to(device),
                 torch.randint(0, 50257, shape, generator=g).to(device)) for _ in range(n)]

    return _state(model, batches(sizes["train"]), batches(sizes["test"]), device, "lm")


def _state(model, train, test, device, task_type):
    return {
        "model": model, "train": train, "test": test, "device": device, "task_type": task_type,
        "criterion": nn.CrossEntropyLoss(),
        "host_optimizer": torch.optim.SGD(model.get_host_parameters(), lr=0.01, momentum=0.9),
        "seed_optimizer": torch.optim.SGD(model.get_seed_parameters(), lr=0.01, momentum=0.9),
        "governor": TolariaGovernor(model),
    }


# ---------------------------------------------------------------- the timed calls


def attribution(state):
    return validate_with_attribution(state["model"], state["test"], state["criterion"], state["device"], state["task_type"])


def two_validation_calls(state):
    metrics = validate_and_get_metrics(
        state["model"], state["train"], state["test"], state["criterion"], state["device"],
        compute_per_class=state["task_type"] == "classification", task_type=state["task_type"],
    )
    return metrics, attribution(state)


def one_validation_call(state):
    return validate_epoch(
        state["model"], state["train"], state["test"], state["criterion"], state["device"],
        compute_per_class=state["task_type"] == "classification", task_type=state["task_type"],
    )


def _train(state):
    train_epoch_blended(state["model"], state["train"], state["criterion"], state["host_optimizer"],
                        state["seed_optimizer"], state["device"], state["task_type"])


def epoch_validate_epoch(state):
    _train(state)
    result = one_validation_call(state)
    state["governor"].snapshot()
    return result


def epoch_drop_in(state):
    _train(state)
    result = two_validation_calls(state)
    state["governor"].snapshot()
    return result


def _reference(fn):
    def run(state):
        with reference_mode():
            return fn(state)

    return run


# ---------------------------------------------------------------- floors


def _attribution_floor(state) -> None:
    """Per test batch: the prefix and the seed once, the suffix on both configurations."""
    model, slot = state["model"], state["model"].seed_slot
    model.eval()
    with torch.inference_mode():
        for inputs, _ in state["test"]:
            host = model.host.forward_to_slot(inputs, model.slot_id)
            seed = slot.seed(host)
            model.host.forward_from_slot(torch.cat([seed, host]), model.slot_id)
    model.train()


def _train_eval_floor(state) -> None:
    """The train-metric pass: one eval forward per train batch (at most 10)."""
    model = state["model"]
    model.eval()
    with torch.inference_mode():
        for inputs, _ in itertools.islice(state["train"], 10):
            model(inputs)
    model.train()


def validation_floor(state):
    _attribution_floor(state)
    _train_eval_floor(state)


def epoch_floor(state):
    _train(state)
    validation_floor(state)


CASES = [
    Case("validation", "attribution cifar10 conv_light blending", _cifar10_setup, _reference(attribution),
         attribution, goal="cpu >= 1.7x", params={"task": "cifar10"}, floor=_attribution_floor),
    Case("validation", "validate_epoch vs both calls cifar10", _cifar10_setup, _reference(two_validation_calls),
         one_validation_call, goal="cpu >= 1.8x", params={"task": "cifar10"}, floor=validation_floor),
    Case("validation", "epoch cifar10 train+validate_epoch+snapshot", _cifar10_setup, _reference(epoch_drop_in),
         epoch_validate_epoch, goal="cpu >= 1.25x", params={"task": "cifar10"}, floor=epoch_floor),
    Case("validation", "attribution tinystories lora layer 2", _tinystories_setup, _reference(attribution),
         attribution, goal="cpu >= 1.4x", params={"task": "tinystories"}, floor=_attribution_floor),
]


@pytest.mark.parametrize("case,device,impl", bench_params(CASES))
def test_validation(benchmark, case, device, impl):
    run_case(benchmark, case, device, impl, rounds=CPU_ROUNDS if device == "cpu" else None)
