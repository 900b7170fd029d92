"""One table of tolerances per dtype, and a comparison that explains its failures."""

import torch

# (rtol, atol) for a result computed in float32 math from inputs of this dtype.
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-6),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
}

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, what: str = "result"):
    """torch.testing.assert_close with the table's tolerance and a count of mismatches."""
    dtype = dtype or expected.dtype
    rtol, atol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    bad = ~torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        samples = ", ".join(f"{i}: {a[tuple(i)].item():.6g} vs {e[tuple(i)].item():.6g}" for i in idx)
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.numel()} elements differ ({dtype}); first: {samples}")
