"""Governor snapshot and rollback: one flat pinned buffer vs the original per-tensor copies.

Every model is timed against both originals in the same run: the per-tensor synchronising
``.cpu().clone()`` (``snapshot_reference``) and the per-tensor reused pinned buffers
(``snapshot_pinned_reference``). The fast side is ``TolariaGovernor.snapshot()`` /
``execute_rollback()``, state-dict walk included on both sides.

    python -m pytest benchmarks/bench_snapshot.py --benchmark-only -q
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common import Case, bench_params, run_case
from esper_fast.ops.reference import restore_reference, snapshot_pinned_reference, snapshot_reference
from esper_fast.tolaria import TolariaGovernor


class _TensorBag(nn.Module):
    """A module that only holds named tensors (a state dict without the forward)."""

    def __init__(self, named: list[tuple[str, torch.Tensor]]):
        super().__init__()
        for name, tensor in named:
            self.register_buffer(name.replace(".", "_"), tensor)


def cifar10_cnn(device: str) -> nn.Module:
    """A small CIFAR-10 CNN: conv-BN blocks of 8/16/32 channels and a linear head (30 tensors)."""
    layers, channels = [], [3, 8, 16, 32, 32]
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(32 * 2 * 2, 10))
    return model.to(device)


def gpt_tensors(device: str, n_layer: int = 6, n_embd: int = 384, vocab: int = 50257, block: int = 1024) -> nn.Module:
    """The tensors of a GPT-2-style model (about 30M parameters with the defaults, 76 tensors)."""
    shapes = [("wte", (vocab, n_embd)), ("wpe", (block, n_embd))]
    for i in range(n_layer):
        shapes += [
            (f"h{i}.ln_1.weight", (n_embd,)), (f"h{i}.ln_1.bias", (n_embd,)),
            (f"h{i}.attn.c_attn.weight", (n_embd, 3 * n_embd)), (f"h{i}.attn.c_attn.bias", (3 * n_embd,)),
            (f"h{i}.attn.c_proj.weight", (n_embd, n_embd)), (f"h{i}.attn.c_proj.bias", (n_embd,)),
            (f"h{i}.ln_2.weight", (n_embd,)), (f"h{i}.ln_2.bias", (n_embd,)),
            (f"h{i}.mlp.c_fc.weight", (n_embd, 4 * n_embd)), (f"h{i}.mlp.c_fc.bias", (4 * n_embd,)),
            (f"h{i}.mlp.c_proj.weight", (4 * n_embd, n_embd)), (f"h{i}.mlp.c_proj.bias", (n_embd,)),
        ]
    shapes += [("ln_f.weight", (n_embd,)), ("ln_f.bias", (n_embd,))]
    return _TensorBag([(name, torch.randn(shape, device=device)) for name, shape in shapes])


def synthetic_1b(device: str) -> nn.Module:
    """1.0B float32 parameters as 60 matrices of 4096 x 4096 and their 4096-element vectors."""
    named = []
    for i in range(60):
        named += [(f"w{i}", torch.randn(4096, 4096, device=device)), (f"b{i}", torch.randn(4096, device=device))]
    return _TensorBag(named)


def _state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _snapshot_setup(build, snapshot_mode="host"):
    def setup(device):
        model = build(device)
        return {
            "model": model,
            "governor": TolariaGovernor(model, snapshot_mode=snapshot_mode),
            "pinned": snapshot_pinned_reference(model),
        }

    return setup


def _rollback_setup(build):
    def setup(device):
        model = build(device)
        return {"model": model, "governor": TolariaGovernor(model), "state": snapshot_reference(model)}

    return setup


def _snapshot_original(state):
    snapshot_reference(state["model"])


def _snapshot_pinned(state):
    snapshot_pinned_reference(state["model"], state["pinned"])


def _snapshot_fast(state):
    state["governor"].snapshot()


def _rollback_original(state):
    restore_reference(state["model"], state["state"], strict=False)


def _rollback_fast(state):
    state["governor"].execute_rollback()


def _bytes(state):
    return _state_bytes(state["model"])


# name, builder, devices, pytest-benchmark rounds, large (4 GB on the device: left out of the
# one-shot GPU check unless asked for)
MODELS = [
    ("cifar10-cnn", cifar10_cnn, ("cpu", "cuda"), None, False),
    ("gpt-30M", gpt_tensors, ("cpu", "cuda"), 10, False),
    ("synthetic-1B", synthetic_1b, ("cuda",), 3, True),
]

CASES = []
for _name, _build, _devices, _rounds, _large in MODELS:
    _params = {"model": _name, "rounds": _rounds} if _rounds else {"model": _name}
    CASES += [
        Case(
            family="snapshot",
            name=f"snapshot {_name} vs original",
            setup=_snapshot_setup(_build),
            reference=_snapshot_original,
            fast=_snapshot_fast,
            bytes_moved=_bytes,
            devices=_devices,
            goal={"gpt-30M": "CUDA >= 5x; CPU >= 1.5x", "cifar10-cnn": "CPU >= 1.5x"}.get(_name, ""),
            params=_params,
            large=_large,
        ),
        Case(
            family="snapshot",
            name=f"snapshot {_name} vs pinned per-tensor",
            setup=_snapshot_setup(_build),
            reference=_snapshot_pinned,
            fast=_snapshot_fast,
            bytes_moved=_bytes,
            devices=_devices,
            goal={"gpt-30M": "CUDA >= 1.5x; CUDA >= 70% of pinned D2H", "synthetic-1B": ">= 70% of pinned D2H"}.get(
                _name, ""
            ),
            params=_params,
            large=_large,
        ),
    ]


# Rollback, and the device-resident option (one device copy, no host transfer), for the
# two real models; a 1B rollback would spend the GPU check's time on the original's copies.
for _name, _build, _devices, _rounds, _large in MODELS[:2]:
    _params = {"model": _name, "rounds": _rounds} if _rounds else {"model": _name}
    CASES.append(
        Case(
            family="snapshot",
            name=f"rollback {_name} vs original",
            setup=_rollback_setup(_build),
            reference=_rollback_original,
            fast=_rollback_fast,
            bytes_moved=_bytes,
            devices=_devices,
            params=_params,
        )
    )
    CASES.append(
        Case(
            family="snapshot",
            name=f"snapshot {_name} device-resident vs pinned per-tensor",
            setup=_snapshot_setup(_build, snapshot_mode="device"),
            reference=_snapshot_pinned,
            fast=_snapshot_fast,
            bytes_moved=_bytes,
            devices=("cuda",),
            params={"model": _name, "snapshot_mode": "device"},
        )
    )


@pytest.mark.parametrize("case,device,impl", bench_params(CASES))
def test_snapshot(benchmark, case, device, impl):
    run_case(benchmark, case, device, impl, rounds=case.params.get("rounds"))
