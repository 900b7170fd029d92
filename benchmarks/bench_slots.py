"""Configurations of several seed slots: the configuration tree against repeated input.

Every live seed BLENDING at alpha 0.5; conv_light seeds on the CNNs (batch 128), lora seeds
on the tinystories transformer (8 x 128 tokens). A configuration switches some live seeds
off (alpha 0) and leaves the others as they are.

- fast: ``MorphogeneticModel.forward_configurations``: one walk over the host, each segment
  once per distinct configuration of the slots above it, each seed once per distinct input.
- reference (a), the newer esper-lite's method: the input repeated K times, each slot
  blending by a per-sample alpha (its alpha on the rows of configurations that keep it, 0
  on the others), one forward over K x B rows.
- reference (b): K ordinary forwards, each with its configuration's alphas forced.
- floor: the same segments and seeds called directly, each once per distinct input, with
  the blends that make the next segment's input: the work no implementation can skip.

All timed in eval mode under ``torch.inference_mode()``. ``validate_epoch`` with two live
seeds (4 configurations, exact Shapley values) is timed against the same call with one.

Run: ``python -m pytest benchmarks/bench_slots.py -o python_files="bench_*.py" --benchmark-only``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn

from common import Case, bench_params, run_case
from esper_fast import ops
from esper_fast.kasmina import CNNHost, MorphogeneticModel, SeedStage
from esper_fast.kasmina.host import forced_alphas
from esper_fast.runtime import TaskConfig
from esper_fast.tolaria import create_model, validate_epoch

CPU_ROUNDS = 7
LM_CPU_ROUNDS = 3
ALPHA = 0.5


def _blend_in(model, slot_id: str, blueprint: str) -> None:
    model.germinate_seed(blueprint, f"bench-{slot_id}", slot=slot_id)
    slot = model.slot(slot_id)
    slot.state.transition(SeedStage.TRAINING)
    slot.state.transition(SeedStage.BLENDING)
    slot.set_alpha(ALPHA)
    if blueprint == "lora":
        nn.init.normal_(slot.seed.up.weight, std=0.02)  # a seed that changes the output


def cifar10_model(device: str, live: list[str]):
    """The cifar10 task model with a conv_light seed blending in each slot of ``live``."""
    torch.manual_seed(0)
    model = create_model("cifar10", device)
    for slot_id in live:
        if slot_id not in model.seed_slots:
            model.add_slot(slot_id)
        _blend_in(model, slot_id, "conv_light")
    return model


def cnn4_model(device: str):
    torch.manual_seed(0)
    host = CNNHost(num_classes=10, n_blocks=4, base_channels=8)
    model = MorphogeneticModel(host, device, slots=list(host.injection_points), task_config=TaskConfig.for_cifar10())
    for slot_id in model.seed_slots:
        _blend_in(model, slot_id, "conv_light")
    return model


def tinystories_model(device: str):
    torch.manual_seed(0)
    model = create_model("tinystories", device)
    live = ["layer_1_post_block", "layer_3_post_block", "layer_5_post_block"]
    for slot_id in live:
        if slot_id not in model.seed_slots:
            model.add_slot(slot_id)
        _blend_in(model, slot_id, "lora")
    return model


def every_subset(live: list[str]) -> list[dict]:
    return [
        {s: 0.0 for s in live if s not in subset}
        for size in range(len(live), -1, -1)
        for subset in itertools.combinations(live, size)
    ]


def esper_lite_twelve(live: list[str]) -> list[dict]:
    """The newer esper-lite's list for 3 live seeds: main, each seed off, each seed alone,
    all off, each pair alone, and the committed configuration (only fossils on: all off)."""
    off = {s: 0.0 for s in live}
    configurations = [{}] + [{s: 0.0} for s in live] + [{t: 0.0 for t in live if t != s} for s in live] + [off]
    configurations += [{t: 0.0 for t in live if t not in pair} for pair in itertools.combinations(live, 2)]
    return configurations + [off]


def _state(model, inputs, live, configurations):
    model.eval()
    batch = inputs.shape[0]
    # (a)'s per-sample alphas: per slot, its alpha on the rows of the configurations that keep it.
    per_sample = {
        slot_id: torch.tensor(
            [c.get(slot_id, model.slot(slot_id).alpha) for c in configurations], device=inputs.device
        ).repeat_interleave(batch)
        for slot_id in live
    }
    return {"model": model, "x": inputs, "live": live, "configurations": configurations, "per_sample": per_sample}


def _cnn_inputs(device: str, batch: int = 128):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)


def _tokens(device: str):
    return torch.randint(0, 50257, (8, 128), generator=torch.Generator().manual_seed(1)).to(device)


def cifar10_setup(device):
    live = ["block2_post", "block3_post"]
    return _state(cifar10_model(device, live), _cnn_inputs(device), live, every_subset(live))


def cnn4_setup(device):
    model = cnn4_model(device)
    live = list(model.seed_slots)
    return _state(model, _cnn_inputs(device), live, every_subset(live))


def cnn4_twelve_setup(device):
    model = cnn4_model(device)
    live = list(model.seed_slots)
    return _state(model, _cnn_inputs(device), live, esper_lite_twelve(live))


def tinystories_setup(device):
    model = tinystories_model(device)
    live = ["layer_1_post_block", "layer_3_post_block", "layer_5_post_block"]
    return _state(model, _tokens(device), live, every_subset(live))


# ---------------------------------------------------------------- the timed calls


def configuration_tree(state):
    with torch.inference_mode():
        return state["model"].forward_configurations(state["x"], state["configurations"])


def repeated_input(state):
    """(a): the input repeated K times, every slot blending by its per-sample alpha."""
    x, k = state["x"], len(state["configurations"])
    with torch.inference_mode(), forced_alphas(state["model"].seed_slots, state["per_sample"]):
        return state["model"](x.repeat(k, *([1] * (x.dim() - 1))))


def forward_per_configuration(state):
    """(b): one ordinary forward per configuration under its forced alphas."""
    outputs = []
    with torch.inference_mode():
        for configuration in state["configurations"]:
            with forced_alphas(state["model"].seed_slots, configuration):
                outputs.append(state["model"](state["x"]))
    return outputs


def walk_floor(state):
    """Each segment once per distinct configuration of the live slots above it (every
    subset: 2^k groups after k slots), each seed once per distinct input."""
    model, live = state["model"], state["live"]
    host, previous = model.host, None
    with torch.inference_mode():
        h = state["x"]
        for slot_id in live:
            h = host.forward_between(h, previous, slot_id)
            seed = model.slot(slot_id).seed
            h = torch.cat([ops.blend(h, seed(h), ALPHA), h])
            previous = slot_id
        return host.forward_between(h, previous, None)


# ---------------------------------------------------------------- validate_epoch, 2 live seeds vs 1


def _validation_setup(device, live):
    model = cifar10_model(device, live)
    g = torch.Generator().manual_seed(2)
    sizes = {"train": 8, "test": 8} if device == "cpu" else {"train": 100, "test": 40}

    def batches(n):
        return [(torch.randn(128, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (128,), generator=g).to(device))
                for _ in range(n)]

    return {"model": model, "train": batches(sizes["train"]), "test": batches(sizes["test"]), "device": device,
            "live": live}


def validation_setup(device):
    return {
        "one": _validation_setup(device, ["block2_post"]),
        "two": _validation_setup(device, ["block2_post", "block3_post"]),
    }


def _validate(state):
    return validate_epoch(state["model"], state["train"], state["test"], nn.CrossEntropyLoss(), state["device"],
                          compute_per_class=True)


def validate_one_live(states):
    return _validate(states["one"])


def validate_two_live(states):
    return _validate(states["two"])


def validate_two_live_floor(states):
    """The test batches' walk over both slots and the train pass's forwards."""
    state = states["two"]
    model = state["model"]
    model.eval()
    for inputs, _ in state["test"]:
        walk_floor({"model": model, "live": state["live"], "x": inputs})
    with torch.inference_mode():
        for inputs, _ in state["train"]:
            model(inputs)
    model.train()


CASES = [
    Case("slots", "cifar10 cnn 2 live, 4 subsets vs repeated input", cifar10_setup, repeated_input,
         configuration_tree, goal="cpu >= 2.5x", floor=walk_floor, params={"configs": 4, "reference": "a"}),
    Case("slots", "cifar10 cnn 2 live, 4 subsets vs 4 forwards", cifar10_setup, forward_per_configuration,
         configuration_tree, goal="cpu >= 2.5x", floor=walk_floor, params={"configs": 4, "reference": "b"}),
    Case("slots", "cnn 4 blocks 3 live, 8 subsets vs repeated input", cnn4_setup, repeated_input,
         configuration_tree, goal="cpu >= 4x", floor=walk_floor, params={"configs": 8, "reference": "a"}),
    Case("slots", "cnn 4 blocks 3 live, esper-lite 12 vs repeated input", cnn4_twelve_setup, repeated_input,
         configuration_tree, goal="cpu >= 6x", floor=walk_floor, params={"configs": 12, "reference": "a"}),
    Case("slots", "tinystories 3 live (1,3,5), 8 subsets vs repeated input", tinystories_setup, repeated_input,
         configuration_tree, goal="cpu >= 1.25x", floor=walk_floor, params={"configs": 8, "reference": "a"}),
    # ratio = time with one live seed / time with two: ">= 0.87x" is "at most 1.15x the time".
    Case("slots", "validate_epoch cifar10 2 live vs 1 live", validation_setup, validate_one_live,
         validate_two_live, goal="cpu >= 0.87x", floor=validate_two_live_floor, params={"configs": 4}),
]


@pytest.mark.parametrize("case,device,impl", bench_params(CASES))
def test_slots(benchmark, case, device, impl):
    rounds = None
    if device == "cpu":
        rounds = LM_CPU_ROUNDS if "tinystories" in case.name else CPU_ROUNDS
    run_case(benchmark, case, device, impl, rounds=rounds)
