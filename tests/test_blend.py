"""The blend family (esper_fast.ops.blend / ste) against its pure-torch reference."""

import math

import pytest
import torch

from esper_fast.ops import blend, reference_mode, ste
from esper_fast.ops.reference import blend_reference, ste_reference
from tolerances import FLOAT_DTYPES, TOLERANCES, assert_close

OPS = torch.ops.esper_fast

# Per-sample gates on both sides of the lerp's branch point, on the clamp's bounds and beyond them.
GATES = [-0.5, 0.0, 0.3, 0.7, 1.0, 1.5]


def randn(shape, dtype, device, memory_format=torch.contiguous_format):
    return torch.randn(shape, device=device).to(dtype).contiguous(memory_format=memory_format)


def run(fn, host, seed, alpha, grad_out, detach_host=True):
    """fn's output and the gradients it gives host, seed and (a tensor) alpha for grad_out."""
    h = host.detach().clone().requires_grad_(True)
    s = seed.detach().clone().requires_grad_(True)
    a = alpha
    if isinstance(alpha, torch.Tensor):
        a = alpha.detach().clone().requires_grad_(alpha.requires_grad)
    y = fn(h, s, a, detach_host)
    y.backward(grad_out)
    return y, h.grad, s.grad, a.grad if isinstance(a, torch.Tensor) else None


def expected_alpha_grad(host, seed, alpha, grad_out):
    """sum over each alpha group of g * (seed - host) in float64, zero where the clamp blocks it,
    plus the tolerance float32 accumulation over those terms allows."""
    terms = grad_out.double() * (seed.double() - host.double())
    if alpha.numel() == 1:
        sums, scale = terms.sum().reshape(1), terms.abs().sum().reshape(1)
    else:
        per_sample = terms.reshape(terms.shape[0], terms[0].numel() if terms.shape[0] else 0)
        sums, scale = per_sample.sum(1), per_sample.abs().sum(1)
    flat = alpha.detach().double().reshape(-1)
    sums = torch.where((flat >= 0) & (flat <= 1), sums, torch.zeros_like(sums))
    return sums.reshape(alpha.shape), 1e-5 * scale.reshape(alpha.shape) + 1e-6


def check_alpha_grad(actual, host, seed, alpha, grad_out):
    expected, tolerance = expected_alpha_grad(host, seed, alpha, grad_out)
    assert actual.shape == alpha.shape and actual.dtype == alpha.dtype
    error = (actual.detach().double().cpu() - expected.cpu()).abs()
    assert (error <= tolerance.cpu()).all(), f"d_alpha {actual} != {expected}"


def check_blend(host, seed, alpha, detach_host=True):
    """Values and gradients of blend vs blend_reference for these inputs."""
    grad_out = torch.randn_like(host)
    y, dh, ds, da = run(blend, host, seed, alpha, grad_out, detach_host)
    yr, dhr, dsr, _ = run(blend_reference, host, seed, alpha, grad_out, detach_host)
    assert_close(y, yr, what="blend")
    assert_close(ds, dsr, what="d_seed")
    if detach_host:
        assert dh is None
    else:
        assert_close(dh, dhr, what="d_host")
    if isinstance(alpha, torch.Tensor) and alpha.requires_grad:
        check_alpha_grad(da, host, seed, alpha, grad_out)
    return y, dh, ds


# ---------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("detach_host", [True, False])
@pytest.mark.parametrize("alpha_kind", ["float", "per_sample", "per_sample_grad", "single_tensor_grad"])
def test_blend_matches_reference(device, dtype, detach_host, alpha_kind):
    host, seed = randn((6, 3, 5, 7), dtype, device), randn((6, 3, 5, 7), dtype, device)
    if alpha_kind == "float":
        alpha = 0.3
    elif alpha_kind == "single_tensor_grad":
        alpha = torch.tensor(0.7, device=device, requires_grad=True)
    else:
        alpha = torch.tensor(GATES, device=device, requires_grad=alpha_kind == "per_sample_grad")
    check_blend(host, seed, alpha, detach_host)


@pytest.mark.parametrize("alpha", [-1.0, 0.0, 0.25, 0.5, 0.75, 1.0, 2.0, float("nan"), float("inf")])
def test_blend_float_alpha_is_clamped_like_reference(device, alpha):
    host, seed = randn((4, 33), torch.float32, device), randn((4, 33), torch.float32, device)
    y, _, _ = check_blend(host, seed, alpha, detach_host=False)
    clamped = max(0.0, min(1.0, alpha))
    if clamped in (0.0, 1.0):
        # The lerp is exact at its ends: alpha 0 gives host, alpha 1 gives seed.
        assert torch.equal(y, host if clamped == 0.0 else seed)


@pytest.mark.parametrize("shape", [(), (1,), (6,), (6, 1), (6, 1, 1, 1), (1, 1, 1, 1, 1)])
def test_blend_alpha_shapes(device, shape):
    host, seed = randn((6, 2, 3, 5), torch.float32, device), randn((6, 2, 3, 5), torch.float32, device)
    numel = math.prod(shape)
    values = torch.tensor(GATES[:numel] if numel > 1 else [0.4], device=device).reshape(shape)
    alpha = values.requires_grad_(True)
    check_blend(host, seed, alpha, detach_host=False)


def test_blend_alpha_of_another_dtype(device):
    host, seed = randn((6, 9), torch.float32, device), randn((6, 9), torch.float32, device)
    alpha = torch.tensor(GATES, dtype=torch.float64, device=device, requires_grad=True)
    check_blend(host, seed, alpha)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("misaligned", [False, True])
def test_blend_long_samples(device, dtype, misaligned):
    # Several tasks/tiles per sample, the second sample starting off the 16-byte grid; with
    # `misaligned` the data pointer itself is off the grid (the kernels' scalar path).
    offset = int(misaligned)
    host = randn((2 * 70001 + offset,), dtype, device)[offset:].view(2, 70001)
    seed = randn((2, 70001), dtype, device)
    alpha = torch.tensor([0.2, 0.9], device=device, requires_grad=True)
    check_blend(host, seed, alpha, detach_host=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
@pytest.mark.parametrize("misaligned", ["seed", "grad", "none"])
def test_blend_one_tensor_off_the_vector_grid(device, dtype, misaligned):
    # One tensor a single element off the 16-byte grid must send the whole call down the
    # scalar path; odd sample lengths put every sample's edges off the grid as well.
    shape = (5, 3, 37)

    def make(name):
        offset = int(misaligned == name)
        return randn((math.prod(shape) + offset,), dtype, device)[offset:].view(shape)

    host, seed, grad = randn(shape, dtype, device), make("seed"), make("grad")
    alpha = torch.tensor([0.1, 0.4, 0.6, 0.9, 1.2], dtype=torch.float32, device=device)
    y = OPS.blend_forward.default(host, seed, alpha, 0.0)
    assert_close(y, blend_reference(host, seed, alpha))
    d_host, d_seed, d_alpha = OPS.blend_backward.default(grad, host, seed, alpha, 0.0, True, True, True)
    a = alpha.clamp(0, 1).to(dtype).reshape(5, 1, 1)
    assert_close(d_seed, grad * a)
    assert_close(d_host, grad * (1 - a))
    check_alpha_grad(d_alpha, host, seed, alpha, grad)


def test_blend_alpha_grad_mask_sees_alpha_own_value(device):
    # float64 gates just outside [0, 1] round onto the bounds in float32 data; torch.clamp's
    # gradient mask is taken on the float64 value, so their d_alpha is 0, not sum(g * (seed - host)).
    host, seed = randn((5, 33), torch.float32, device), randn((5, 33), torch.float32, device)
    alpha = torch.tensor([1 + 2**-30, -1e-50, 1.0, 0.0, -(2**-1074)], dtype=torch.float64, device=device,
                         requires_grad=True)
    grad_out = torch.randn_like(host)
    y, _, ds, da = run(blend, host, seed, alpha, grad_out)
    yr, _, dsr, dar = run(blend_reference, host, seed, alpha, grad_out)
    assert torch.equal(y, yr) and torch.equal(ds, dsr)
    assert torch.equal(y[[0, 2]], seed[[0, 2]]) and torch.equal(y[[1, 3, 4]], host[[1, 3, 4]])
    assert da[[0, 1, 4]].tolist() == [0.0, 0.0, 0.0] and dar[[0, 1, 4]].tolist() == [0.0, 0.0, 0.0]
    assert (da[[2, 3]] != 0).all()
    check_alpha_grad(da, host, seed, alpha, grad_out)
    # The op itself, as the CUDA and CPU kernels see it.
    d_alpha = OPS.blend_backward.default(grad_out, host, seed, alpha.detach(), 0.0, False, False, True)[2]
    assert d_alpha[[0, 1, 4]].tolist() == [0.0, 0.0, 0.0]


# ---------------------------------------------------------------- bit for bit against torch.lerp

# Float gates on both sides of the lerp's branch point and at its ends, and ones whose complement
# differs between 1 - float(alpha) and float(1 - alpha).
BIT_ALPHAS = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0, 0.123456789]


def lerp_autograd(host, seed, weight, grad_out):
    """torch.lerp's output and autograd's d_host, d_seed: the original's exact numbers."""
    h, s = host.detach().clone().requires_grad_(True), seed.detach().clone().requires_grad_(True)
    y = torch.lerp(h, s, weight)
    return (y, *torch.autograd.grad(y, (h, s), grad_out))


def blend_autograd(host, seed, alpha, grad_out):
    h, s = host.detach().clone().requires_grad_(True), seed.detach().clone().requires_grad_(True)
    y = blend(h, s, alpha, detach_host=False)
    return (y, *torch.autograd.grad(y, (h, s), grad_out))


def assert_bit_equal(actual, expected, what):
    for name, a, e in zip(("forward", "d_host", "d_seed"), actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape, f"{what} {name}"
        differ = a != e
        assert torch.equal(a, e), (f"{what} {name}: {int(differ.sum())}/{a.numel()} differ, first "
                                   f"{a[differ][:3].tolist()} vs {e[differ][:3].tolist()}")


BIT_CASES = [((3, 5, 7, 11), torch.contiguous_format), ((3, 5, 7, 11), torch.channels_last), ((4099,), None)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float64])
@pytest.mark.parametrize("shape,memory_format", BIT_CASES, ids=["contiguous", "channels_last", "1d_odd"])
def test_blend_float_alpha_is_bit_identical_to_torch_lerp(device, dtype, shape, memory_format):
    # The original calls torch.lerp(host, seed, float_alpha): forward, d_host = g * (1 - alpha) with
    # the complement in double, and d_seed = g * alpha must come out bit for bit.
    host = randn(shape, dtype, device, memory_format or torch.contiguous_format)
    seed = randn(shape, dtype, device, memory_format or torch.contiguous_format)
    grad_out = randn(shape, dtype, device, memory_format or torch.contiguous_format)
    for alpha in BIT_ALPHAS:
        assert_bit_equal(blend_autograd(host, seed, alpha, grad_out), lerp_autograd(host, seed, alpha, grad_out),
                         f"{dtype} alpha={alpha}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float64])
@pytest.mark.parametrize("alpha_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,memory_format", BIT_CASES[:2], ids=["contiguous", "channels_last"])
def test_blend_tensor_alpha_is_bit_identical_to_torch_lerp(device, dtype, alpha_dtype, shape, memory_format):
    # A tensor gate: the original's weight is alpha.clamp(0, 1).to(dtype), and lerp's d_host is
    # g * (1 - weight) with the complement in the weight's dtype.
    gates = torch.tensor(BIT_ALPHAS + [-0.2, 1.3], dtype=alpha_dtype, device=device)
    host = randn((len(gates),) + shape[1:], dtype, device, memory_format)
    seed = randn(host.shape, dtype, device, memory_format)
    grad_out = randn(host.shape, dtype, device, memory_format)
    weight = gates.clamp(0, 1).to(dtype).reshape(-1, 1, 1, 1)
    assert_bit_equal(blend_autograd(host, seed, gates, grad_out), lerp_autograd(host, seed, weight, grad_out),
                     f"{dtype} per-sample {alpha_dtype}")
    for gate in gates:
        weight = gate.clamp(0, 1).to(dtype)
        assert_bit_equal(blend_autograd(host, seed, gate, grad_out), lerp_autograd(host, seed, weight, grad_out),
                         f"{dtype} single {alpha_dtype} {gate.item()}")


# ---------------------------------------------------------------- sizes and layouts


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 5), (1,), (1, 1, 1, 13), (3, 5, 7, 9), (5,)])
@pytest.mark.parametrize("per_sample", [False, True])
def test_blend_sizes(device, shape, per_sample):
    host, seed = randn(shape, torch.float32, device), randn(shape, torch.float32, device)
    alpha = torch.rand(shape[0], device=device, requires_grad=True) if per_sample else 0.6
    y, dh, ds = check_blend(host, seed, alpha, detach_host=False)
    assert y.shape == host.shape and dh.shape == host.shape and ds.shape == host.shape


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "layout", ["channels_last", "channels_last_3d", "transposed", "sliced", "mixed", "permuted_batch"]
)
def test_blend_layouts(device, dtype, layout):
    if layout == "channels_last":
        host = randn((6, 3, 5, 7), dtype, device, torch.channels_last)
        seed = randn((6, 3, 5, 7), dtype, device, torch.channels_last)
    elif layout == "channels_last_3d":
        host = randn((6, 3, 2, 5, 7), dtype, device, torch.channels_last_3d)
        seed = randn((6, 3, 2, 5, 7), dtype, device, torch.channels_last_3d)
    elif layout == "transposed":
        host = randn((6, 7, 5), dtype, device).transpose(1, 2)
        seed = randn((6, 7, 5), dtype, device).transpose(1, 2)
    elif layout == "sliced":
        host = randn((6, 3, 10, 7), dtype, device)[:, :, ::2]
        seed = randn((6, 3, 10, 7), dtype, device)[:, 1:, :5]
        host, seed = host[:, :2], seed
    elif layout == "mixed":
        host = randn((6, 3, 5, 7), dtype, device, torch.channels_last)
        seed = randn((6, 3, 5, 7), dtype, device)
    else:  # dense, but the batch dimension is not the outermost one in memory
        host = randn((5, 6), dtype, device).t()
        seed = randn((5, 6), dtype, device).t()
    alpha = torch.tensor(GATES, device=device, requires_grad=True)
    y, _, _ = check_blend(host, seed, alpha, detach_host=False)
    s = ste(host, seed)
    assert torch.equal(bits(s), bits(host))
    # Outputs keep a channels_last(_3d) host's layout; other layouts come out contiguous.
    fmt = {"channels_last": torch.channels_last, "mixed": torch.channels_last, "channels_last_3d": torch.channels_last_3d}
    fmt = fmt.get(layout, torch.contiguous_format)
    grad = torch.randn_like(host)
    grads = OPS.blend_backward.default(grad, host, seed, alpha.detach(), 0.0, True, True, True)
    for out in (y, s, grads[0], grads[1]):
        assert out.is_contiguous(memory_format=fmt)


# ---------------------------------------------------------------- NaN / Inf and the STE


def special_values(dtype, device):
    values = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1.5, -2.25], device=device)
    return values.to(dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_blend_nan_inf_matches_reference(device, dtype):
    specials = special_values(dtype, device)
    host = specials.repeat_interleave(len(specials)).reshape(7, 7)
    seed = specials.repeat(len(specials)).reshape(7, 7)
    for alpha in (0.3, 0.8, torch.tensor([0.0, 0.3, 0.5, 0.8, 1.0, 0.1, 0.9], device=device)):
        y = blend(host, seed, alpha)
        assert_close(y, blend_reference(host, seed, alpha), what=f"blend alpha={alpha}")


def bits(t):
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(width)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float64])
def test_ste_is_host_bit_for_bit(device, dtype):
    host = torch.cat([special_values(dtype, device), randn((37,), dtype, device)])
    # A NaN with a non-default payload must survive too.
    host = host.clone()
    bits(host)[0] = bits(host)[0] | 1
    seed = randn(host.shape, dtype, device)
    y = ste(host, seed)
    assert torch.equal(bits(y), bits(host))


@pytest.mark.parametrize("write", ["output", "host"])
def test_ste_output_is_a_tensor_of_its_own(device, write):
    # Whatever shares memory underneath, writing one of host and y leaves the other unchanged.
    host, seed = randn((6, 33), torch.float32, device), randn((6, 33), torch.float32, device)
    saved = host.clone()
    y = ste(host, seed)
    (y if write == "output" else host).add_(1.0)
    assert torch.equal(host if write == "output" else y, saved)
    assert torch.equal(y if write == "output" else host, saved + 1.0)
    assert not torch._C._is_alias_of(y, host)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "transposed"])
def test_ste_cpu_moves_no_bytes_for_a_whole_dense_tensor(layout):
    # The least work: a copy-on-write clone of a whole dense host; other layouts are copied.
    base = torch.randn(4, 3, 5, 6)
    host = {"contiguous": base, "channels_last": base.contiguous(memory_format=torch.channels_last),
            "sliced": base[1:], "transposed": base.transpose(2, 3)}[layout]
    y = ste(host, torch.randn_like(host))
    shared = layout in ("contiguous", "channels_last")
    assert torch._C._is_cow_tensor(y) == shared
    assert y.stride() == (host.stride() if shared else y.contiguous().stride())
    assert torch.equal(y, host)


# Views that are not dense in any layout the kernels walk (or dense only from an offset).
NON_DENSE_VIEWS = {
    "strided": lambda t: t[..., ::2],
    "sliced_channels": lambda t: t[:, 1:4],
    "batch_offset": lambda t: t[1:],
    "transposed": lambda t: t.transpose(2, 3),
    "permuted": lambda t: t.permute(1, 3, 0, 2),
    "expanded": lambda t: t[:1, :1].expand(4, 6, 10, 8),
    "channels_last_strided": lambda t: t.contiguous(memory_format=torch.channels_last)[:, :, ::3],
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float64])
@pytest.mark.parametrize("layout", list(NON_DENSE_VIEWS))
def test_ste_non_dense_host(device, dtype, layout):
    # One copy straight from host's strides into a contiguous output: the host's bits, a tensor
    # of its own, and the incoming gradient reaching host's base and seed as the reference's does.
    view = NON_DENSE_VIEWS[layout]
    base = torch.cat([special_values(dtype, device), randn((4 * 6 * 10 * 8 - 7,), dtype, device)]).reshape(4, 6, 10, 8)
    bits(base).view(-1)[0] |= 1  # a NaN with a non-default payload
    host = view(base)
    seed = randn(host.shape, dtype, device)
    y = ste(host, seed)
    assert y.shape == host.shape and y.stride() == torch.empty(host.shape).stride()
    assert torch.equal(bits(y), bits(host))
    assert not torch._C._is_alias_of(y, host)
    grad_out = randn(host.shape, dtype, device)
    grads = []
    for fn in (ste, ste_reference):
        leaf, seed_leaf = base.clone().requires_grad_(True), seed.clone().requires_grad_(True)
        fn(view(leaf), seed_leaf).backward(grad_out)
        grads.append((leaf.grad, seed_leaf.grad))
    (d_base, d_seed), (d_base_ref, d_seed_ref) = grads
    assert torch.equal(d_seed, grad_out) and torch.equal(d_seed_ref, d_seed)
    assert torch.equal(d_base, d_base_ref)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_ste_gradients(device, dtype, memory_format):
    host = randn((3, 5, 7, 9), dtype, device, memory_format)
    seed = randn((3, 5, 7, 9), dtype, device, memory_format)
    grad_out = torch.randn_like(host)
    y, dh, ds, _ = run(lambda h, s, a, d: ste(h, s), host, seed, None, grad_out)
    yr, dhr, dsr, _ = run(lambda h, s, a, d: ste_reference(h, s), host, seed, None, grad_out)
    assert torch.equal(bits(y), bits(host))
    assert_close(y, yr)
    assert torch.equal(dh, grad_out) and torch.equal(ds, grad_out)
    assert torch.equal(dhr, dh) and torch.equal(dsr, ds)
    assert y.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("shape", [(0,), (1,), (1, 1, 1, 13), (3, 5, 7, 9)])
def test_ste_sizes(device, shape):
    host, seed = randn(shape, torch.float32, device), randn(shape, torch.float32, device)
    y = ste(host, seed)
    assert y.shape == host.shape and torch.equal(y, host)


# ---------------------------------------------------------------- gradcheck, opcheck, compile


def test_blend_gradcheck(device):
    host = torch.randn(3, 2, 5, dtype=torch.float64, device=device, requires_grad=True)
    seed = torch.randn(3, 2, 5, dtype=torch.float64, device=device, requires_grad=True)
    # Away from the clamp's kinks, where finite differences are meaningful.
    alpha = torch.tensor([0.2, 0.6, 0.85], dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, s, a: blend(h, s, a, detach_host=False), (host, seed, alpha))
    assert torch.autograd.gradcheck(lambda h, s: blend(h, s, 0.35, detach_host=False), (host, seed))
    outside = torch.tensor([-0.4, 1.3, 0.5], dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, a: blend(host.detach(), s, a), (seed, outside))


@pytest.mark.parametrize("alpha_kind", ["per_sample", "single_tensor", "outside_clamp", "float"])
def test_blend_gradgradcheck(device, alpha_kind):
    # Second-order gradients (gradient penalties) are real: blend_backward is differentiable again.
    host = torch.randn(3, 2, 5, dtype=torch.float64, device=device, requires_grad=True)
    seed = torch.randn(3, 2, 5, dtype=torch.float64, device=device, requires_grad=True)
    if alpha_kind == "float":
        assert torch.autograd.gradgradcheck(lambda h, s: blend(h, s, 0.35, detach_host=False), (host, seed))
        return
    values = {"per_sample": [0.2, 0.6, 0.85], "single_tensor": 0.4, "outside_clamp": [-0.4, 1.3, 0.5]}[alpha_kind]
    alpha = torch.tensor(values, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda h, s, a: blend(h, s, a, detach_host=False), (host, seed, alpha))
    assert torch.autograd.gradgradcheck(lambda s, a: blend(host.detach(), s, a), (seed, alpha))


def test_blend_gradient_penalty_matches_reference(device):
    """d/d(inputs) of a penalty on every first-order gradient, against torch.lerp's double backward."""
    host = torch.randn(4, 3, 5, dtype=torch.float64, device=device)
    seed = torch.randn(4, 3, 5, dtype=torch.float64, device=device)
    alpha = torch.tensor([0.2, 0.7, 1.4, 0.5], dtype=torch.float64, device=device)
    weight = torch.randn(4, 3, 5, dtype=torch.float64, device=device)

    def penalty_grads(fn, a):
        h, s = host.clone().requires_grad_(True), seed.clone().requires_grad_(True)
        a = a.clone().requires_grad_(True) if isinstance(a, torch.Tensor) else a
        inputs = (h, s, a) if isinstance(a, torch.Tensor) else (h, s)
        y = fn(h, s, a, False)
        first = torch.autograd.grad((y * weight * y).sum(), inputs, create_graph=True)
        penalty = sum((f**2).sum() for f in first)
        return torch.autograd.grad(penalty, inputs)

    for a in (alpha, alpha[1].clone(), 0.3):
        fast, ref = penalty_grads(blend, a), penalty_grads(blend_reference, a)
        for name, f, r in zip(("host", "seed", "alpha"), fast, ref):
            torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-12, msg=lambda m: f"d penalty / d {name}: {m}")
        if isinstance(a, torch.Tensor):
            assert (fast[2] != 0).any(), "the penalty's alpha gradient must not vanish"


def test_ste_gradgradcheck(device):
    host = torch.randn(3, 4, dtype=torch.float64, device=device, requires_grad=True)
    seed = torch.randn(3, 4, dtype=torch.float64, device=device)
    assert torch.autograd.gradgradcheck(lambda h: ste(h, seed) * h, (host,))
    # The seed's gradient (g, by design) carries second-order terms too: a penalty on it.
    h, s = host.detach().clone().requires_grad_(True), seed.clone().requires_grad_(True)
    w = torch.randn(3, 4, dtype=torch.float64, device=device, requires_grad=True)
    for fn in (ste, ste_reference):
        (gs,) = torch.autograd.grad((fn(h, s) ** 2 * w).sum(), s, create_graph=True)
        dw, dh = torch.autograd.grad((gs**2).sum(), (w, h))
        if fn is ste:
            fast = (dw, dh)
    torch.testing.assert_close(fast[0], dw, rtol=0, atol=0)
    torch.testing.assert_close(fast[1], dh, rtol=0, atol=0)


def test_ste_gradcheck(device):
    # Only host's gradient is a true derivative; seed's (by design not one) is checked exactly in
    # test_ste_gradients.
    host = torch.randn(3, 4, dtype=torch.float64, device=device, requires_grad=True)
    seed = torch.randn(3, 4, dtype=torch.float64, device=device)
    assert torch.autograd.gradcheck(lambda h: ste(h, seed), (host,))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_opcheck(device, memory_format):
    def make(requires_grad=False):
        return randn((3, 4, 5, 2), torch.float32, device, memory_format).requires_grad_(requires_grad)

    alpha = torch.tensor([0.2, 0.7, 1.2], device=device, requires_grad=True)
    torch.library.opcheck(OPS.blend_forward.default, (make(True), make(True), None, 0.4))
    torch.library.opcheck(OPS.blend_forward.default, (make(), make(True), alpha, 0.0))
    grad, host, seed = make(), make(), make()
    plain_alpha = alpha.detach()
    torch.library.opcheck(OPS.blend_backward.default, (grad, None, None, None, 0.4, True, True, False))
    torch.library.opcheck(OPS.blend_backward.default, (grad, host, seed, plain_alpha, 0.0, False, True, True))
    # blend_backward is differentiable (double backward): its autograd kernel, traced too.
    torch.library.opcheck(OPS.blend_backward.default, (make(True), make(True), make(True), alpha, 0.0, True, True, True))
    torch.library.opcheck(OPS.blend_backward.default, (make(True), None, None, None, 0.4, True, True, False))
    torch.library.opcheck(OPS.ste_forward.default, (make(True), make(True)))


def test_compile_fullgraph():
    torch._dynamo.reset()

    def step(host, seed, gate):
        return blend(host, seed, gate, detach_host=False) + ste(host, seed) * 0.5

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    host = torch.randn(4, 6, requires_grad=True)
    seed = torch.randn(4, 6, requires_grad=True)
    gate = torch.tensor([0.1, 0.5, 0.9, 1.4], requires_grad=True)
    out = compiled(host, seed, gate)
    out.sum().backward()
    expected = step(host.detach(), seed.detach(), gate.detach())
    assert_close(out, expected)
    assert_close(host.grad, (1 - gate.detach().clamp(0, 1))[:, None].expand(4, 6) + 0.5)
    assert_close(seed.grad, gate.detach().clamp(0, 1)[:, None].expand(4, 6) + 0.5)
    assert_close(gate.grad, torch.where(gate.detach() <= 1, (seed - host).detach().sum(1), torch.zeros(4)))


# ---------------------------------------------------------------- errors


def test_errors_name_the_problem():
    host = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"seed has shape \(3, 5\) but host has shape \(3, 4\)"):
        blend(host, torch.randn(3, 5), 0.5)
    with pytest.raises(ValueError, match="seed has dtype torch.float16 but host has dtype torch.float32"):
        blend(host, torch.randn(3, 4, dtype=torch.float16), 0.5)
    with pytest.raises(ValueError, match="seed is on meta but host is on cpu"):
        blend(host, torch.randn(3, 4, device="meta"), 0.5)
    with pytest.raises(ValueError, match="host must be float32, float16, bfloat16 or float64, got torch.int64"):
        blend(torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long), 0.5)
    with pytest.raises(ValueError, match=r"alpha of shape \(2,\) does not broadcast .* expected \[\], \[1\], \[3\]"):
        blend(host, torch.randn(3, 4), torch.rand(2))
    with pytest.raises(ValueError, match=r"alpha of shape \(3, 4\) does not broadcast"):
        blend(host, torch.randn(3, 4), torch.rand(3, 4))
    with pytest.raises(ValueError, match="alpha is on meta but host is on cpu"):
        blend(host, torch.randn(3, 4), torch.rand(3, device="meta"))
    with pytest.raises(ValueError, match="alpha must be a floating point tensor"):
        blend(host, torch.randn(3, 4), torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"esper_fast.ste: seed has shape \(4, 3\)"):
        ste(host, torch.randn(4, 3))


def test_kernel_checks_name_the_problem(device):
    host = torch.randn(3, 4, device=device)
    with pytest.raises(RuntimeError, match=r"seed has shape \[3, 5\] but host has shape \[3, 4\]"):
        OPS.blend_forward.default(host, torch.randn(3, 5, device=device), None, 0.5)
    with pytest.raises(RuntimeError, match="seed has dtype Half but host has dtype Float"):
        OPS.ste_forward.default(host, torch.randn(3, 4, device=device, dtype=torch.half))
    with pytest.raises(RuntimeError, match=r"alpha of shape \[2\] does not broadcast over the batch dimension"):
        OPS.blend_forward.default(host, host, torch.rand(2, device=device), 0.0)
    with pytest.raises(RuntimeError, match="host must be float64, float32, float16 or bfloat16"):
        OPS.blend_forward.default(host.long(), host.long(), None, 0.5)
    with pytest.raises(RuntimeError, match="need_alpha_grad needs host, seed and alpha"):
        OPS.blend_backward.default(host, None, None, None, 0.5, True, True, True)


@pytest.mark.cuda
@pytest.mark.parametrize("alpha_shape", [(3,), ()])
def test_kernel_rejects_alpha_on_another_device(alpha_shape):
    # A CPU alpha, the 0-dim scalar included, is an error: never a silent read through a sync.
    host = torch.randn(3, 4, device="cuda")
    alpha = torch.rand(alpha_shape)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="alpha is on cpu but host is on cuda"):
            OPS.blend_forward.default(host, host, alpha, 0.0)
        with pytest.raises(RuntimeError, match="alpha is on cpu but host is on cuda"):
            OPS.blend_backward.default(host, host, host, alpha, 0.0, True, True, True)
        with pytest.raises(ValueError, match="alpha is on cpu but host is on cuda"):
            blend(host, host, alpha)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
def test_kernel_rejects_cpu_host_with_cuda_seed_or_alpha():
    # A CUDA seed or alpha picks the CUDA kernel for a CPU host: the op's own message, checked
    # before any CUDA guard is built on the host's (CPU) device.
    host = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="seed is on cuda:0 but host is on cpu"):
        OPS.blend_forward.default(host, host.cuda(), None, 0.5)
    with pytest.raises(RuntimeError, match="alpha is on cuda:0 but host is on cpu"):
        OPS.blend_forward.default(host, host, torch.rand(3, device="cuda"), 0.0)
    with pytest.raises(RuntimeError, match="seed is on cuda:0 but host is on cpu"):
        OPS.ste_forward.default(host, host.cuda())


@pytest.mark.cuda
def test_kernel_rejects_grad_on_another_device():
    # host and seed on the GPU pick the CUDA kernel even when grad_out is on the CPU.
    host = torch.randn(3, 4, device="cuda")
    with pytest.raises(RuntimeError, match="grad_out is on cpu but another argument is on a CUDA device"):
        OPS.blend_backward.default(torch.randn(3, 4), host, host, None, 0.5, True, True, False)


@pytest.mark.cuda
def test_cuda_blend_past_int32_indexing():
    # Two samples of 2**30 + 19 bfloat16 elements: offsets past int32 in the vector loop, in the
    # per-sample edges and (one element off the 16-byte grid) in the scalar path.
    per_sample = 2**30 + 19
    numel = 2 * per_sample
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * numel * 2:
        pytest.skip("needs about 52 GB of free GPU memory")
    host_off_grid = torch.randn(numel + 1, device="cuda", dtype=torch.bfloat16)[1:].view(2, per_sample)
    host = host_off_grid.clone()
    seed = torch.randn(2, per_sample, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(2, per_sample, device="cuda", dtype=torch.bfloat16)
    alpha = torch.tensor([0.25, 0.75], device="cuda")
    ends = [slice(0, 4099), slice(per_sample - 4099, None)]
    for h in (host, host_off_grid):
        y = OPS.blend_forward.default(h, seed, alpha, 0.0)
        for part in ends:
            assert_close(y[:, part], blend_reference(host[:, part], seed[:, part], alpha))
        del y
    for h in (host, host_off_grid):
        d_host, d_seed, d_alpha = OPS.blend_backward.default(grad, h, seed, alpha, 0.0, True, True, True)
        for part in ends:
            assert_close(d_seed[:, part], (grad[:, part].float() * alpha[:, None]).bfloat16())
            assert_close(d_host[:, part], (grad[:, part].float() * (1 - alpha[:, None])).bfloat16())
        del d_host, d_seed
        expected = torch.zeros(2, dtype=torch.float64, device="cuda")
        scale = torch.zeros(2, dtype=torch.float64, device="cuda")
        for start in range(0, per_sample, 2**27):
            part = slice(start, start + 2**27)
            terms = grad[:, part].double() * (seed[:, part].double() - host[:, part].double())
            expected += terms.sum(1)
            scale += terms.abs().sum(1)
        assert ((d_alpha.double() - expected).abs() <= 1e-5 * scale + 1e-6).all(), (d_alpha, expected)


@pytest.mark.cuda
def test_cuda_blend_does_not_synchronise():
    host = torch.randn(8, 64, 9, device="cuda", requires_grad=True)
    seed = torch.randn(8, 64, 9, device="cuda", requires_grad=True)
    alpha = torch.rand(8, device="cuda", requires_grad=True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = blend(host, seed, alpha, detach_host=False) + blend(host, seed, 0.3) + ste(host, seed)
        torch.autograd.backward(y, torch.ones_like(y))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert alpha.grad is not None


# Per-sample groups small enough for the CUDA kernels' packed tiles (<= 1024 elements), one past
# it, a group of one element, and the sizes the benchmarks time, shrunk.
SMALL_GROUPS = [(4097, 16), (4097, 3), (3001, 1), (7, 1024), (7, 1025), (2, 513)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", SMALL_GROUPS, ids=lambda s: f"{s[0]}x{s[1]}")
def test_blend_small_per_sample_groups(device, dtype, shape):
    host, seed = randn(shape, dtype, device), randn(shape, dtype, device)
    alpha = torch.rand(shape[0], device=device) * 1.4 - 0.2  # some gates beyond the clamp
    alpha.requires_grad_(True)
    grad_out = randn(shape, dtype, device)
    y, dh, ds, da = run(blend, host, seed, alpha, grad_out, detach_host=False)
    weight = alpha.detach().clamp(0, 1).to(dtype)[:, None]
    assert_bit_equal((y, dh, ds), lerp_autograd(host, seed, weight, grad_out), f"{dtype} {shape}")
    check_alpha_grad(da, host, seed, alpha, grad_out)
    # Without d_alpha the kernels take their other variant.
    d_host, d_seed, _ = OPS.blend_backward.default(grad_out, None, None, alpha.detach(), 0.0, True, True, False)
    assert torch.equal(d_host, dh) and torch.equal(d_seed, ds)


@pytest.mark.cuda
@pytest.mark.parametrize("alpha_kind", ["single_tensor", "per_sample", "float"])
def test_cuda_blend_more_tiles_than_resident_blocks(alpha_kind):
    # (8, 2**20) float32: 256 tiles per sample, 2048 in all, more than the resident grid, so
    # blocks stride over tiles and each sample's d_alpha adds many tile sums.
    shape = (8, 2**20)
    host, seed, grad_out = (torch.randn(shape, device="cuda") for _ in range(3))
    alpha = {"single_tensor": torch.tensor(0.3, device="cuda"), "float": 0.7,
             "per_sample": torch.linspace(-0.1, 1.1, 8, device="cuda")}[alpha_kind]
    if isinstance(alpha, torch.Tensor):
        alpha.requires_grad_(True)
    y, dh, ds, da = run(blend, host, seed, alpha, grad_out, detach_host=False)
    weight = alpha.detach().clamp(0, 1).reshape(-1, 1) if isinstance(alpha, torch.Tensor) else alpha
    assert_bit_equal((y, dh, ds), lerp_autograd(host, seed, weight, grad_out), alpha_kind)
    if isinstance(alpha, torch.Tensor):
        check_alpha_grad(da, host, seed, alpha, grad_out)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(8, 2**20), (2**16, 16), (2**16, 3), (3, 4099)], ids=str)
@pytest.mark.parametrize("per_sample", [False, True])
def test_cuda_blend_alpha_grad_is_the_same_from_run_to_run(shape, per_sample):
    # No float atomics: d_alpha is added in an order fixed by the shapes, so every run gives the
    # same bits.
    host, seed, grad_out = (torch.randn(shape, device="cuda") for _ in range(3))
    alpha = torch.rand(shape[0] if per_sample else 1, device="cuda")
    results = {OPS.blend_backward.default(grad_out, host, seed, alpha, 0.0, False, False, True)[2].cpu().numpy().tobytes()
               for _ in range(20)}
    assert len(results) == 1


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_denormals_are_not_flushed(dtype):
    # Built without --use_fast_math: float32 ops keep denormals (no .ftz), so alpha 0 gives the
    # host and alpha 1 the seed bit for bit, and small alphas match torch.lerp's CUDA kernel.
    tiny = torch.finfo(dtype).tiny
    host = torch.tensor([tiny / 3, -tiny / 7, tiny * 2**-10, -tiny * 2**-20, 0.0, 1.0] * 50, dtype=dtype, device="cuda")
    seed = torch.tensor([tiny / 5, tiny / 2, -tiny * 2**-12, tiny * 2**-15, tiny / 9, 2.0] * 50, dtype=dtype,
                        device="cuda")
    assert (host[:4] != 0).all() and (host.abs()[:4] < tiny).all()
    grad_out = host.flip(0).clone()
    for alpha in (0.0, 1.0, 1e-3, 0.25, 0.75):
        assert_bit_equal(blend_autograd(host, seed, alpha, grad_out), lerp_autograd(host, seed, alpha, grad_out),
                         f"{dtype} alpha={alpha}")
    per_sample = torch.tensor([0.0, 1.0], dtype=dtype, device="cuda")
    y = blend(host.view(2, -1), seed.view(2, -1), per_sample)
    assert torch.equal(bits(y[0]), bits(host.view(2, -1)[0])) and torch.equal(bits(y[1]), bits(seed.view(2, -1)[1]))
    assert torch.equal(bits(ste(host, seed)), bits(host))


@pytest.mark.cuda
def test_cuda_blend_on_a_side_stream():
    # The kernels run on the current stream: inputs written behind a sleep on that stream are read
    # after the write, and the outputs are complete once that stream is.
    host, seed, grad_out = (torch.randn(64, 1000, device="cuda") for _ in range(3))
    alpha = torch.rand(64, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        host.add_(1.0)
        grad_out.mul_(2.0)
        y, dh, ds, da = run(blend, host, seed, alpha, grad_out, detach_host=False)
        s = ste(host, seed)
    side.synchronize()
    weight = alpha.detach().clamp(0, 1)[:, None]
    assert_bit_equal((y, dh, ds), lerp_autograd(host, seed, weight, grad_out), "side stream")
    check_alpha_grad(da, host, seed, alpha, grad_out)
    assert torch.equal(s, host)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_blend_on_the_second_device_while_the_first_is_current():
    torch.cuda.set_device(0)
    host, seed, grad_out = (torch.randn(6, 3, 5, 7, device="cuda:1") for _ in range(3))
    alpha = torch.rand(6, device="cuda:1", requires_grad=True)
    y, dh, ds, da = run(blend, host, seed, alpha, grad_out, detach_host=False)
    assert y.device == dh.device == da.device == torch.device("cuda:1")
    weight = alpha.detach().clamp(0, 1).reshape(-1, 1, 1, 1)
    assert_bit_equal((y, dh, ds), lerp_autograd(host, seed, weight, grad_out), "cuda:1")
    check_alpha_grad(da, host, seed, alpha, grad_out)
    assert torch.equal(ste(host, seed), host) and torch.cuda.current_device() == 0


def test_reference_mode_routes_to_reference():
    host, seed = torch.randn(2, 3), torch.randn(2, 3)
    with reference_mode():
        assert torch.equal(blend(host, seed, 0.25), blend_reference(host, seed, 0.25))
        assert torch.equal(ste(host, seed), ste_reference(host, seed))
