"""Several candidate seeds in one slot (issue 25): what an incubation epoch and a judgement
cost with K candidates against one seed.

The cifar10 task model (batch 128, batches already on the device) with candidates at
``block2_post``; the tinystories task model (full size, short sequences on CPU) with
candidates at ``layer_2_post_block``.

- ``incubation``: ``train_epoch_incubator_mode`` with the candidates in TRAINING (one host
  optimizer, one seed optimizer holding a parameter group per candidate). reference: the same
  epoch with one candidate (conv_light, lora). fast: with all of them. Each candidate learns on
  the detached host features through the straight-through estimator.
- ``judgement``: ``judge_candidates`` over the test batches (none, then each candidate at
  alpha 1, in one shared pass) against one ``validate_epoch`` of the model with one seed
  BLENDING at alpha 0.5 (as ``bench_validation.py`` times it).

ratio = reference / fast, so "K candidates in at most N times the time of one" is
``>= 1/N x``. floor: the work no implementation can skip, timed alike from the model's own
pieces in the same run: for an epoch, the host's forward and backward once, each candidate's
forward and backward on the slot's features and the optimizer steps; for a judgement, the host
up to the slot once, each candidate once and the rest of the host on the K + 1 configurations
stacked along the batch.

Run: ``python -m pytest benchmarks/bench_candidates.py -o python_files="bench_*.py" --benchmark-only``.
On a shared machine the sides timed one after the other see different loads; ``python
benchmarks/bench_candidates.py --rounds 15 --json out.json`` times them interleaved instead
(one call of each side in turn, medians).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import pytest
import torch
import torch.nn as nn

from bench_validation import one_validation_call
from common import Case, bench_params, run_case
from esper_fast.kasmina import SeedStage
from esper_fast.runtime.tasks import get_task_spec
from esper_fast.tolaria import judge_candidates, train_epoch_incubator_mode
from esper_fast.tolaria.batches import compute_loss

CPU_ROUNDS = 7
LM_CPU_ROUNDS = 3
TASKS = {
    "cifar10": {"slot": "block2_post", "blueprints": ["conv_light", "depthwise", "attention", "norm"],
                "task_type": "classification"},
    "tinystories": {"slot": "layer_2_post_block", "blueprints": ["lora", "mlp", "attention"], "task_type": "lm"},
}
SIZES = {
    "cifar10": {"cpu": {"train": 8, "test": 8, "batch": 128}, "cuda": {"train": 40, "test": 20, "batch": 128}},
    "tinystories": {"cpu": {"train": 2, "test": 2, "batch": 4, "seq": 64},
                    "cuda": {"train": 10, "test": 10, "batch": 32, "seq": 256}},
}


def _sizes(task: str, device: str) -> dict:
    return SIZES[task]["cuda" if device.startswith("cuda") else "cpu"]


def _batches(task: str, device: str, count: int, seed: int):
    sizes, g = _sizes(task, device), torch.Generator().manual_seed(seed)
    if task == "cifar10":
        make = lambda: (torch.randn(sizes["batch"], 3, 32, 32, generator=g),  # noqa: E731
                        torch.randint(0, 10, (sizes["batch"],), generator=g))
    else:
        shape = (sizes["batch"], sizes["seq"])
        make = lambda: (torch.randint(0, 50257, shape, generator=g), torch.randint(0, 50257, shape, generator=g))  # noqa: E731
    return [tuple(t.to(device) for t in make()) for _ in range(count)]


def _model(task: str, device: str, blueprints: list[str], stage: SeedStage):
    """The task's model with ``blueprints`` germinated together in the bench slot, walked to
    ``stage`` (BLENDING at alpha 0.5 for one seed); lm projections that start at zero are
    drawn from N(0, 0.02) so that every candidate changes the output."""
    torch.manual_seed(0)
    spec = TASKS[task]
    model = get_task_spec(task).create_model(device, slots=[spec["slot"]])
    model.germinate_candidates(blueprints)
    slot = model.seed_slot
    slot.advance_stage(SeedStage.TRAINING)
    if stage == SeedStage.BLENDING:
        slot.state.transition(SeedStage.BLENDING)
        slot.set_alpha(0.5)
    with torch.no_grad():
        for candidate in slot.candidates:
            for param in candidate.seed.parameters():
                if not param.abs().sum():
                    param.normal_(std=0.02)
    return model


def _state(task: str, device: str, blueprints: list[str], stage: SeedStage = SeedStage.TRAINING) -> dict:
    model = _model(task, device, blueprints, stage)
    sizes = _sizes(task, device)
    seed_groups = [{"params": list(c.seed.parameters())} for c in model.seed_slot.candidates]
    return {
        "model": model, "slot": model.slot_id, "device": device, "task_type": TASKS[task]["task_type"],
        "train": _batches(task, device, sizes["train"], seed=1), "test": _batches(task, device, sizes["test"], seed=2),
        "criterion": nn.CrossEntropyLoss(),
        "host_optimizer": torch.optim.SGD(model.get_host_parameters(), lr=0.01, momentum=0.9),
        "seed_optimizer": torch.optim.SGD(seed_groups, lr=0.01, momentum=0.9),
    }


def incubation_setup(task: str):
    def setup(device: str) -> dict:
        blueprints = TASKS[task]["blueprints"]
        return {"one": _state(task, device, blueprints[:1]), "all": _state(task, device, blueprints)}

    return setup


def judgement_setup(task: str):
    def setup(device: str) -> dict:
        blueprints = TASKS[task]["blueprints"]
        return {"one": _state(task, device, blueprints[:1], SeedStage.BLENDING), "all": _state(task, device, blueprints)}

    return setup


# ---------------------------------------------------------------- the timed calls


def _incubation_epoch(state) -> None:
    train_epoch_incubator_mode(state["model"], state["train"], state["criterion"], state["host_optimizer"],
                               state["seed_optimizer"], state["device"], state["task_type"])


def incubate_one(states):
    _incubation_epoch(states["one"])


def incubate_all(states):
    _incubation_epoch(states["all"])


def validate_one(states):
    state = states["one"]
    return one_validation_call(state)


def judge_all(states):
    state = states["all"]
    return judge_candidates(state["model"], state["slot"], state["test"], state["criterion"], state["device"],
                            state["task_type"])


# ---------------------------------------------------------------- floors


def incubation_floor(states) -> None:
    """Per batch: the host's forward and backward once (its features' gradient taken at the
    slot), each candidate's forward on the detached features and backward of that gradient,
    and the optimizer steps."""
    state = states["all"]
    model, slot_id = state["model"], state["slot"]
    host, candidates = model.host, model.seed_slot.candidates
    optimizers = (state["host_optimizer"], state["seed_optimizer"])
    model.train()
    for inputs, labels in state["train"]:
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        features = host.forward_to_slot(inputs, slot_id)
        joined = features.detach().requires_grad_()
        loss = compute_loss(host.forward_from_slot(joined, slot_id), labels, state["criterion"], state["task_type"])
        loss.backward()
        seed_outputs = [candidate.seed(features.detach()) for candidate in candidates]
        torch.autograd.backward([features, *seed_outputs], [joined.grad] * (1 + len(seed_outputs)))
        for optimizer in optimizers:
            optimizer.step()


def judgement_floor(states) -> None:
    """Per test batch: the host up to the slot once, each candidate once, the rest of the
    host on the K + 1 configurations stacked."""
    state = states["all"]
    model, slot_id = state["model"], state["slot"]
    candidates = model.seed_slot.candidates
    model.eval()
    with torch.inference_mode():
        for inputs, _ in state["test"]:
            features = model.host.forward_to_slot(inputs, slot_id)
            joined = [features] + [candidate.seed(features) for candidate in candidates]
            model.host.forward_from_slot(torch.cat(joined), slot_id)
    model.train()


CASES = [
    # ratio = time with one candidate / time with four: ">= 0.625x" is "at most 1.6x the time".
    Case("candidates", "incubation epoch cifar10, 4 candidates vs 1", incubation_setup("cifar10"), incubate_one,
         incubate_all, goal="cpu >= 0.625x, cpu >= 80% of floor", floor=incubation_floor,
         params={"task": "cifar10", "candidates": 4}),
    # ratio = one validate_epoch / the judgement: ">= 0.5x" is "at most 2x the time".
    Case("candidates", "judgement cifar10, 4 candidates vs one validate_epoch", judgement_setup("cifar10"),
         validate_one, judge_all, goal="cpu >= 0.5x", floor=judgement_floor,
         params={"task": "cifar10", "candidates": 4}),
    Case("candidates", "incubation epoch tinystories, 3 candidates vs 1", incubation_setup("tinystories"),
         incubate_one, incubate_all, floor=incubation_floor, params={"task": "tinystories", "candidates": 3}),
    Case("candidates", "judgement tinystories, 3 candidates vs one validate_epoch", judgement_setup("tinystories"),
         validate_one, judge_all, floor=judgement_floor, params={"task": "tinystories", "candidates": 3}),
]


@pytest.mark.parametrize("case,device,impl", bench_params(CASES))
def test_candidates(benchmark, case, device, impl):
    rounds = None
    if device == "cpu":
        rounds = LM_CPU_ROUNDS if "tinystories" in case.name else CPU_ROUNDS
    run_case(benchmark, case, device, impl, rounds=rounds)


def interleaved(case: Case, rounds: int, device: str = "cpu", clock=time.perf_counter) -> dict:
    """Medians (ms) of ``rounds`` calls per side, one call of each side in turn after a warm-up."""
    state = case.setup(device)
    sides = {"reference": case.reference, "fast": case.fast, "floor": case.floor}
    times = {side: [] for side in sides}
    for fn in sides.values():
        fn(state)
    for _ in range(rounds):
        for side, fn in sides.items():
            start = clock()
            fn(state)
            times[side].append(clock() - start)
    ms = {side: 1e3 * statistics.median(values) for side, values in times.items()}
    return {"reference_ms": ms["reference"], "fast_ms": ms["fast"], "floor_ms": ms["floor"],
            "ratio": ms["reference"] / ms["fast"], "pct_work_floor": 100 * ms["floor"] / ms["fast"], "rounds": rounds}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="time the cases interleaved (cpu)")
    parser.add_argument("--rounds", type=int, default=15, help="calls per side (a third of them for tinystories)")
    parser.add_argument("-k", default="", help="only the cases whose name contains this")
    parser.add_argument("--threads", type=int, help="torch threads; 1 times the thread's CPU time, which other "
                        "tenants of the machine move less (default: torch's threads, wall time)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    clock = time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
        clock = time.thread_time if args.threads == 1 else clock
    results = {"threads": torch.get_num_threads(), "clock": clock.__name__}
    for case in CASES:
        if args.k in case.name:
            rounds = max(3, args.rounds // 3) if "tinystories" in case.name else args.rounds
            results[case.name] = row = interleaved(case, rounds, clock=clock)
            print(f"{case.name:<58} ref {row['reference_ms']:9.1f} ms  fast {row['fast_ms']:9.1f} ms  "
                  f"ratio {row['ratio']:5.2f}x  floor {row['floor_ms']:9.1f} ms  {row['pct_work_floor']:4.0f}% of floor",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
