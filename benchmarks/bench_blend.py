"""Blend family: fused lerp and STE (forward + backward) vs the original composite ops.

Run: ``python -m pytest benchmarks/bench_blend.py --benchmark-only -q``. Each case times one
training step's worth of the op: the forward, then ``torch.autograd.grad`` of a fixed upstream
gradient (so no ``.grad`` accumulation is timed).
"""

from __future__ import annotations

import math

import pytest
import torch

from common import Case, bench_params, run_case
from esper_fast.ops import blend, ste
from esper_fast.ops.reference import blend_reference, ste_reference

ALPHA = 0.3  # a float gate, as the seed slot passes it

SHAPES = {
    # A CNN host's features after a block: channels_last, as CNNHost lays them out.
    "128x16x16x16": ((128, 16, 16, 16), torch.channels_last),
    # A transformer host's residual stream: batch x tokens x embedding.
    "32x256x384": ((32, 256, 384), torch.contiguous_format),
    # Large enough that nothing stays in cache.
    "64M": ((64, 1024, 1024), torch.contiguous_format),
}
LARGE_NUMEL = 64 * 1024 * 1024
CPU_ROUNDS_LARGE = 3  # the 64M case on a small CPU: a few rounds, seconds not minutes


def _tensors(shape, memory_format, dtype, device, host_grad, seed_grad):
    def make(requires_grad):
        t = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=memory_format)
        return t.requires_grad_(requires_grad)

    return {"host": make(host_grad), "seed": make(seed_grad), "grad": make(False)}


def _lerp_step(fn, detach_host):
    def step(state):
        y = fn(state["host"], state["seed"], state["alpha"], detach_host=detach_host)
        inputs = (state["seed"],) if detach_host else (state["host"], state["seed"])
        if isinstance(state["alpha"], torch.Tensor) and state["alpha"].requires_grad:
            inputs = inputs + (state["alpha"],)
        return torch.autograd.grad(y, inputs, state["grad"])

    return step


def _ste_step(fn):
    def step(state):
        y = fn(state["host"], state["seed"])
        return torch.autograd.grad(y, (state["host"], state["seed"]), state["grad"])

    return step


def _bytes(passes):
    # Least traffic: `passes` element-sized reads + writes over the whole tensor.
    return lambda state: passes * state["grad"].numel() * state["grad"].element_size()


def _cases():
    cases = []
    for label, (shape, memory_format) in SHAPES.items():
        for dtype, devices in ((torch.float32, ("cpu", "cuda")), (torch.bfloat16, ("cuda",))):
            dname = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
            params = {"shape": label, "dtype": dname, "numel": math.prod(shape), "memory_format": str(memory_format)}
            big = math.prod(shape) >= LARGE_NUMEL
            bandwidth_goal = "; cuda: >= 80% of device-copy bandwidth" if big else ""

            def setup_lerp(device, shape=shape, fmt=memory_format, dtype=dtype, host_grad=True):
                return {**_tensors(shape, fmt, dtype, device, host_grad, True), "alpha": ALPHA}

            cases.append(
                Case(
                    family="blend",
                    name=f"lerp fwd+bwd {label} {dname}",
                    setup=setup_lerp,
                    reference=_lerp_step(blend_reference, detach_host=False),
                    fast=_lerp_step(blend, detach_host=False),
                    # forward reads host, seed and writes y; backward reads g, writes d_host and d_seed
                    bytes_moved=_bytes(6),
                    devices=devices,
                    goal=">= 1.3x (never slower)" + bandwidth_goal,
                    params=params,
                )
            )
            cases.append(
                Case(
                    family="blend",
                    name=f"lerp fwd+bwd detached host {label} {dname}",
                    setup=lambda device, f=setup_lerp: f(device, host_grad=False),
                    reference=_lerp_step(blend_reference, detach_host=True),
                    fast=_lerp_step(blend, detach_host=True),
                    # forward 2 reads + 1 write; backward reads g, writes d_seed
                    bytes_moved=_bytes(5),
                    devices=devices,
                    goal="never slower" + bandwidth_goal,
                    params=params,
                )
            )
            cases.append(
                Case(
                    family="blend",
                    name=f"ste fwd+bwd {label} {dname}",
                    setup=lambda device, shape=shape, fmt=memory_format, dtype=dtype: _tensors(
                        shape, fmt, dtype, device, True, True
                    ),
                    reference=_ste_step(ste_reference),
                    fast=_ste_step(ste),
                    # forward copies host; backward hands g to both inputs without touching it
                    bytes_moved=_bytes(2),
                    devices=devices,
                    goal=">= 3x" + bandwidth_goal,
                    params=params,
                )
            )

    # The per-sample gate with a trainable alpha: backward also reduces g * (seed - host) per sample.
    def setup_gate(device):
        state = _tensors((32, 256, 384), torch.contiguous_format, torch.float32, device, True, True)
        state["alpha"] = torch.rand(32, device=device, requires_grad=True)
        return state

    cases.append(
        Case(
            family="blend",
            name="lerp fwd+bwd per-sample alpha grad 32x256x384 fp32",
            setup=setup_gate,
            reference=_lerp_step(blend_reference, detach_host=False),
            fast=_lerp_step(blend, detach_host=False),
            # forward 2 reads + 1 write; backward reads g, host, seed, writes d_host and d_seed
            bytes_moved=_bytes(8),
            goal="never slower",
            params={"shape": "32x256x384", "dtype": "fp32", "numel": 32 * 256 * 384, "alpha": "per-sample, grad"},
        )
    )
    # Small per-sample groups: [2**20, 16] and [2**20, 3] with a trainable alpha per row. One tile
    # per group left most threads idle; the CUDA kernels pack whole groups into each tile.
    for width in (16, 3):
        def setup_rows(device, width=width):
            state = _tensors((2**20, width), torch.contiguous_format, torch.float32, device, True, True)
            state["alpha"] = torch.rand(2**20, device=device, requires_grad=True)
            return state

        cases.append(
            Case(
                family="blend",
                name=f"lerp fwd+bwd per-sample alpha grad 1Mx{width} fp32",
                setup=setup_rows,
                reference=_lerp_step(blend_reference, detach_host=False),
                fast=_lerp_step(blend, detach_host=False),
                # as the 32x256x384 gate case, plus reading alpha and writing d_alpha (one per row)
                bytes_moved=lambda state: 8 * state["grad"].numel() * 4 + 2 * state["alpha"].numel() * 4,
                devices=("cuda",),
                goal="never slower",
                params={"shape": f"{2**20}x{width}", "dtype": "fp32", "numel": 2**20 * width,
                        "alpha": "per-sample, grad"},
            )
        )
    # The STE of a host that is a strided view (every other feature of a wider tensor): the
    # output is gathered from host's strides in one copy.
    def setup_ste_strided(device):
        wide = torch.randn(32, 256, 768, device=device)
        return {"host": wide[..., ::2].requires_grad_(True), "seed": torch.randn(32, 256, 384, device=device,
                                                                                requires_grad=True),
                "grad": torch.randn(32, 256, 384, device=device)}

    cases.append(
        Case(
            family="blend",
            name="ste fwd+bwd strided view 32x256x384 fp32",
            setup=setup_ste_strided,
            reference=_ste_step(ste_reference),
            fast=_ste_step(ste),
            # forward reads host's elements and writes y; backward hands g on untouched
            bytes_moved=_bytes(2),
            goal="never slower",
            params={"shape": "32x256x384", "dtype": "fp32", "numel": 32 * 256 * 384,
                    "memory_format": "strided view [..., ::2]"},
        )
    )
    return cases


CASES = _cases()


@pytest.mark.parametrize("case,device,impl", bench_params(CASES))
def test_blend(benchmark, case, device, impl):
    rounds = CPU_ROUNDS_LARGE if device == "cpu" and case.params["numel"] >= LARGE_NUMEL else None
    run_case(benchmark, case, device, impl, rounds=rounds)
