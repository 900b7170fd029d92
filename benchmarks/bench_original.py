"""esper_fast against esper-lite itself, imported beside it in the same process.

Set ``ESPER_LITE_SRC`` to an esper-lite checkout's ``src`` folder (the original's
``esper.tolaria`` and ``esper.leyline`` are imported from there, under their own names, next
to ``esper_fast``); without it the module has no cases. The cases are bench_validation's,
with the reference side running the original's own functions on the original's own model
built from the same torch seed (so both sides hold the same weights and data).

Run: ``ESPER_LITE_SRC=/path/to/esper-lite/src python -m pytest benchmarks/bench_original.py
-o python_files="bench_*.py" --benchmark-only``.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

import bench_validation as fast_cases
from common import Case, bench_params, run_case

ESPER_LITE_SRC = os.environ.get("ESPER_LITE_SRC")


def _original():
    """The original's tolaria and leyline, or None."""
    if not ESPER_LITE_SRC:
        return None
    if ESPER_LITE_SRC not in sys.path:
        sys.path.insert(0, ESPER_LITE_SRC)
    return importlib.import_module("esper.tolaria"), importlib.import_module("esper.leyline")


def _original_model(task: str, blueprint: str, slot_id: str | None = None):
    tolaria, leyline = _original()
    return fast_cases.blending_model(tolaria.create_model, leyline.SeedStage, task, "cpu", blueprint, slot_id)


def _with_original(fast_setup, task, blueprint, slot_id=None):
    def setup(device):
        state = fast_setup(device)
        tolaria, _ = _original()
        model = _original_model(task, blueprint, slot_id)
        state["original"] = {
            "model": model,
            "governor": tolaria.TolariaGovernor(model),
            "host_optimizer": torch.optim.SGD(model.get_host_parameters(), lr=0.01, momentum=0.9),
            "seed_optimizer": torch.optim.SGD(model.get_seed_parameters(), lr=0.01, momentum=0.9),
        }
        return state

    return setup


def original_attribution(state):
    tolaria, _ = _original()
    return tolaria.validate_with_attribution(
        state["original"]["model"], state["test"], state["criterion"], state["device"], state["task_type"]
    )


def original_two_calls(state):
    tolaria, _ = _original()
    metrics = tolaria.validate_and_get_metrics(
        state["original"]["model"], state["train"], state["test"], state["criterion"], state["device"],
        compute_per_class=state["task_type"] == "classification", task_type=state["task_type"],
    )
    return metrics, original_attribution(state)


def original_epoch(state):
    tolaria, _ = _original()
    side = state["original"]
    tolaria.train_epoch_blended(side["model"], state["train"], state["criterion"], side["host_optimizer"],
                                side["seed_optimizer"], state["device"], state["task_type"])
    result = original_two_calls(state)
    side["governor"].snapshot()
    return result


def _cases() -> list[Case]:
    if _original() is None:
        return []
    cifar = _with_original(fast_cases._cifar10_setup, "cifar10", "conv_light")
    lm = _with_original(fast_cases._tinystories_setup, "tinystories", "lora", "layer_2_post_block")
    cpu = ("cpu",)
    return [
        Case("original", "esper-lite attribution cifar10", cifar, original_attribution, fast_cases.attribution,
             devices=cpu, goal="cpu >= 1.7x"),
        Case("original", "esper-lite two calls vs validate_epoch cifar10", cifar, original_two_calls,
             fast_cases.one_validation_call, devices=cpu, goal="cpu >= 1.8x"),
        Case("original", "esper-lite epoch vs train+validate_epoch+snapshot", cifar, original_epoch,
             fast_cases.epoch_validate_epoch, devices=cpu, goal="cpu >= 1.25x"),
        Case("original", "esper-lite epoch vs the drop-in epoch", cifar, original_epoch, fast_cases.epoch_drop_in,
             devices=cpu, goal="cpu >= 1.1x"),
        Case("original", "esper-lite attribution tinystories", lm, original_attribution, fast_cases.attribution,
             devices=cpu, goal="cpu >= 1.4x"),
    ]


CASES = _cases()


@pytest.mark.skipif(not CASES, reason="set ESPER_LITE_SRC to an esper-lite checkout's src folder")
@pytest.mark.parametrize("case,device,impl", bench_params(CASES) or [pytest.param(None, None, None, id="no-original")])
def test_against_esper_lite(benchmark, case, device, impl):
    run_case(benchmark, case, device, impl, rounds=fast_cases.CPU_ROUNDS)
