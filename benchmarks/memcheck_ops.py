"""A short run of every esper_fast op family on CUDA, for ``compute-sanitizer`` (memcheck over
every check; racecheck and synccheck over the blend and metrics checks, ``--checks blend,metrics``).
``--device cpu`` runs the same checks on the CPU kernels: the GPU check's rehearsal.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python3 benchmarks/memcheck_ops.py

Sizes are small and odd (tails, misaligned rows) so that every kernel path runs under the
sanitizer in seconds. Each check also compares against the pure-PyTorch reference, loosely:
the CUDA tests own exact correctness; here a wrong value flags memory read that nothing wrote.
Every check runs whatever happened before it and prints one line,
``memcheck_ops: check <name>: ok`` or ``... FAILED <reason>``; the exit status is 1 if any
check failed. Without the PyTorch caching allocator (the variable above) every tensor is its
own allocation, so an access past a tensor's end is an access past an allocation's end.
``--checks a,b`` runs only the checks whose names start with one of the given prefixes.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from tolerances import assert_close  # noqa: E402  (the tests' own dtype tolerance table)

DEVICE = "cuda"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def _sync():
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def _pair(shape, dtype, channels_last=False):
    host = torch.randn(shape, device=DEVICE, dtype=dtype)
    seed = torch.randn(shape, device=DEVICE, dtype=dtype)
    if channels_last:
        host = host.to(memory_format=torch.channels_last)
        seed = seed.to(memory_format=torch.channels_last)
    return host.requires_grad_(), seed.requires_grad_()


@check
def blend_scalar_alpha():
    from esper_fast.ops import blend, reference

    for dtype in DTYPES:
        for shape in ((3, 5, 7, 9), (1,), (2, 1025)):
            for detach_host in (True, False):
                host, seed = _pair(shape, dtype)
                out = blend(host, seed, 0.37, detach_host=detach_host)
                grad = torch.randn_like(out)
                out.backward(grad)
                ref_host, ref_seed = host.detach().clone().requires_grad_(), seed.detach().clone().requires_grad_()
                ref = reference.blend_reference(ref_host, ref_seed, 0.37, detach_host)
                ref.backward(grad)
                assert_close(out, ref, what=f"blend {dtype} {shape}")
                assert_close(seed.grad, ref_seed.grad, what=f"blend d_seed {dtype} {shape}")
                if detach_host:
                    assert host.grad is None, "a detached host received a gradient"
                else:
                    assert_close(host.grad, ref_host.grad, what=f"blend d_host {dtype} {shape}")


@check
def blend_per_sample_alpha_channels_last():
    for dtype in DTYPES:
        for channels_last in (False, True):
            host, seed = _pair((6, 5, 7, 3), dtype, channels_last)
            alpha = torch.rand(6, device=DEVICE, dtype=dtype).requires_grad_()
            r_alpha, _ = _blend_matches_reference(
                host, seed, alpha, f"blend per-sample {dtype} channels_last={channels_last}"
            )
            # d_alpha sums a whole sample: rounding grows with its length.
            torch.testing.assert_close(alpha.grad.float(), r_alpha.grad.float(), rtol=5e-2, atol=5e-2)


def _blend_matches_reference(host, seed, alpha, what: str):
    """blend with a tensor alpha, host keeping its gradient, forward and backward against the
    reference; returns the reference's alpha (with its gradient) and the incoming gradient."""
    from esper_fast.ops import blend, reference

    out = blend(host, seed, alpha, detach_host=False)
    grad = torch.randn_like(out)
    out.backward(grad)
    r_host, r_seed = host.detach().clone().requires_grad_(), seed.detach().clone().requires_grad_()
    r_alpha = alpha.detach().clone().requires_grad_()
    ref = reference.blend_reference(r_host, r_seed, r_alpha, False)
    ref.backward(grad)
    assert_close(out, ref, what=what)
    assert_close(host.grad, r_host.grad, what=f"{what} d_host")
    assert_close(seed.grad, r_seed.grad, what=f"{what} d_seed")
    return r_alpha, grad


@check
def blend_small_groups_and_long_groups():
    """Per-sample groups of 3 and 16 elements (packed tiles, d_alpha summed in shared memory) and
    groups of several tiles (tile sums added by a second kernel)."""
    for dtype in (torch.float32, torch.bfloat16):
        for shape, per_sample in (((4097, 3), True), ((513, 16), True), ((3, 70001), True), ((2, 70001), False)):
            host, seed = _pair(shape, dtype)
            alpha = torch.rand(shape[0] if per_sample else 1, device=DEVICE).requires_grad_()
            what = f"blend {dtype} {shape} per_sample={per_sample}"
            _, grad = _blend_matches_reference(host, seed, alpha, what)
            expected = (grad.double() * (seed - host).detach().double()).reshape(shape[0], -1).sum(1)
            expected = expected if per_sample else expected.sum().reshape(1)
            scale = (grad.double() * (seed - host).detach().double()).abs().sum()
            assert (alpha.grad.double() - expected).abs().max() <= 1e-2 * scale + 1e-3, f"{what} d_alpha"


@check
def blend_empty():
    from esper_fast.ops import blend

    host, seed = _pair((0, 4), torch.float32)
    out = blend(host, seed, 0.5, detach_host=False)
    out.sum().backward()
    assert out.shape == (0, 4)


@check
def ste_forward_backward():
    from esper_fast.ops import ste

    for dtype in DTYPES:
        for channels_last in (False, True):
            host, seed = _pair((4, 3, 5, 7), dtype, channels_last)
            out = ste(host, seed)
            grad = torch.randn_like(out)
            out.backward(grad)
            assert torch.equal(out.detach(), host.detach()), "ste forward must return the host bit for bit"
            assert torch.equal(host.grad, grad) and torch.equal(seed.grad, grad), "ste backward must pass g through"


def _metrics_round(num_classes: int, rows: int, dtype, per_class: bool):
    from esper_fast.ops import MetricsAccumulator

    accumulator = MetricsAccumulator(num_classes, DEVICE, per_class=per_class, ignore_index=-100)
    expected_correct = 0
    for batch in range(2):
        logits = torch.randn(rows, num_classes, device=DEVICE, dtype=dtype)
        targets = torch.randint(0, num_classes, (rows,), device=DEVICE)
        targets[batch] = -100  # one ignored row per batch
        loss = torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=-100)
        accumulator.update(logits, targets, loss=loss if batch == 0 else None)
        expected_correct += int((logits.argmax(1) == targets).sum())
    result = accumulator.compute()
    values = vars(result) if hasattr(result, "__dict__") else result
    correct = values.get("correct") if isinstance(values, dict) else None
    if isinstance(correct, (int, float)) or (isinstance(correct, torch.Tensor) and correct.numel() == 1):
        assert int(correct) == expected_correct, f"correct {int(correct)} != argmax count {expected_correct}"


@check
def metrics_c10():
    for dtype in DTYPES:
        for per_class in (False, True):
            _metrics_round(10, 37, dtype, per_class)


@check
def metrics_c50257():
    for dtype in (torch.float32, torch.bfloat16):
        _metrics_round(50257, 5, dtype, per_class=False)


@check
def metrics_stacked():
    """K stacked configurations in one launch (short and long rows, a misaligned row start),
    each configuration against the reference's argmax count and cross-entropy."""
    from esper_fast.ops import StackedMetricsAccumulator

    for num_classes, rows in ((10, 37), (4099, 3)):
        for dtype in DTYPES:
            configs = 3
            storage = torch.randn(configs * rows * num_classes + 1, device=DEVICE, dtype=dtype)
            logits = storage[1:].view(configs * rows, num_classes)
            targets = torch.randint(0, num_classes, (rows,), device=DEVICE)
            targets[0] = -100
            stacked = StackedMetricsAccumulator(configs, num_classes, DEVICE, per_class=True)
            stacked.update(logits, targets)
            for k, result in enumerate(stacked.compute()):
                mine = logits[k * rows : (k + 1) * rows]
                expected_correct = int((mine.argmax(1) == targets).sum())
                assert result.correct == expected_correct, f"configuration {k} {dtype}: correct {result.correct}"
                loss = torch.nn.functional.cross_entropy(mine.double(), targets, ignore_index=-100).item()
                assert abs(result.loss - loss) <= 1e-3 * (1 + abs(loss)), f"configuration {k} {dtype}: loss"


def _snapshot_tensors():
    from esper_fast import _C

    return [
        torch.randn(1000, device=DEVICE),
        torch.randn(33, 7, device=DEVICE, dtype=torch.float16),
        torch.randn(5, 3, 2, device=DEVICE, dtype=torch.bfloat16),
        torch.randint(-5, 5, (17,), device=DEVICE, dtype=torch.int64),
        torch.randn(64, 31, device=DEVICE).t(),  # not contiguous
        torch.randn((), device=DEVICE),
        torch.randn(0, 3, device=DEVICE),
        torch.randn(_C.snapshot_staged_copy_bytes // 2 + 1, device=DEVICE),  # over the staging threshold: a direct copy
        torch.randn(1200, 900, device=DEVICE)[:, ::2],  # large and strided
    ]


@check
def snapshot_capture_restore():
    """A list of mixed tensors into the pinned host buffer and back, bit for bit."""
    from esper_fast.ops import HostSnapshot

    tensors = _snapshot_tensors()
    saved = [t.clone() for t in tensors]
    snapshot = HostSnapshot()
    snapshot.capture(tensors)
    _sync()
    for t in tensors:  # overwrite everything, so only a real restore brings the values back
        t.fill_(float("nan") if t.is_floating_point() else -7)
    snapshot.restore(tensors)
    _sync()
    for index, (t, s) in enumerate(zip(tensors, saved)):
        assert torch.equal(t, s), f"tensor {index} ({s.dtype}, {tuple(s.shape)}) not restored bit for bit"


@check
def snapshot_mapping_async_device_resident():
    """A state_dict-like mapping captured without blocking, then into device memory."""
    from esper_fast.ops import HostSnapshot

    for options, capture_kwargs in (({}, {"non_blocking": True}), ({"device_resident": True}, {})):
        tensors = _snapshot_tensors()
        state = {f"t{i}": t for i, t in enumerate(tensors)}
        state["step"] = 3
        saved = [t.clone() for t in tensors]
        snapshot = HostSnapshot(**options)
        snapshot.capture(state, **capture_kwargs)
        if hasattr(snapshot, "wait"):
            snapshot.wait()
        _sync()
        for t in tensors:
            t.fill_(float("nan") if t.is_floating_point() else -7)
        snapshot.restore(state)
        _sync()
        for index, (t, s) in enumerate(zip(tensors, saved)):
            assert torch.equal(t, s), f"{options or capture_kwargs}: tensor {index} not restored bit for bit"


def main(argv: list[str] | None = None) -> int:
    global DEVICE
    parser = argparse.ArgumentParser(description="esper_fast ops under compute-sanitizer")
    parser.add_argument("--checks", default="", help="comma-separated name prefixes (default: every check)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: the same checks on the CPU kernels (the GPU check's rehearsal)")
    args = parser.parse_args([] if argv is None else argv)
    prefixes = [p for p in args.checks.split(",") if p]
    checks = [fn for fn in CHECKS if not prefixes or fn.__name__.startswith(tuple(prefixes))]
    if not checks:
        print(f"memcheck_ops: no check matches {args.checks!r}", flush=True)
        return 1
    if args.device == "cuda" and not torch.cuda.is_available():
        print("memcheck_ops: CUDA is not available", flush=True)
        return 1
    DEVICE = args.device
    import esper_fast

    where = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"memcheck_ops: torch {torch.__version__}, {where}, kernels {esper_fast.kernels_available()[DEVICE]}",
          flush=True)
    failed = 0
    for fn in checks:
        torch.manual_seed(0)
        try:
            fn()
            _sync()
            print(f"memcheck_ops: check {fn.__name__}: ok", flush=True)
        except Exception as exc:  # noqa: BLE001  (report every check, then fail)
            failed += 1
            detail = traceback.format_exception_only(type(exc), exc)[-1].strip().replace("\n", " ")
            print(f"memcheck_ops: check {fn.__name__}: FAILED {detail}", flush=True)
            traceback.print_exc()
    print(f"memcheck_ops: {len(checks)} checks, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
