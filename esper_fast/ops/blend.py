"""The seed blend: a fused lerp towards the seed, and the straight-through estimator.

``blend(host, seed, alpha)`` is ``host + a * (seed - host)`` with ``a = clamp(alpha, 0, 1)``,
one CPU or CUDA kernel per direction (the backward writes ``d_seed``, ``d_host`` and the
per-sample ``d_alpha`` in one pass). ``ste(host, seed)`` returns ``host``'s values as a tensor
of its own, whose gradient flows to both ``host`` and ``seed``: on CPU a copy-on-write clone
(no byte moves unless ``host`` or the result is written afterwards), on CUDA one device copy
(copy-on-write would copy outside the stream order, with a synchronous cudaMemcpy).

Layouts: contiguous, channels_last and channels_last_3d inputs are read in place and the
output keeps that memory format. Any other layout (transposed, sliced...) is first copied to
contiguous, and so is a ``seed`` (or incoming gradient) whose layout differs from ``host``'s;
the STE's output is itself that one copy.

Neither op synchronises with the device: a float alpha is passed as a kernel argument and a
tensor alpha is read by the kernel where it lives.

Autograd is registered in C++ (csrc/blend_autograd.cpp, one per-call cost instead of the Python
layer's); the backward is the ``blend_backward`` custom op. This module adds the fake kernels.
"""

from __future__ import annotations

import torch

from esper_fast.ops.mode import using_reference
from esper_fast.ops.reference import blend_reference, ste_reference

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_blend_forward_op = torch.ops.esper_fast.blend_forward.default
_blend_backward_op = torch.ops.esper_fast.blend_backward.default
_ste_forward_op = torch.ops.esper_fast.ste_forward.default


def blend(host: torch.Tensor, seed: torch.Tensor, alpha, detach_host: bool = True) -> torch.Tensor:
    """``host + a * (seed - host)``, ``a = clamp(alpha, 0, 1)``.

    Args:
        host, seed: same shape, dtype (float32, float16, bfloat16 or float64) and device.
        alpha: a Python float, or a tensor on host's device holding one value (shape ``[]``
            or ``[1]``) or one value per sample (``[B]`` or ``[B, 1, ..., 1]``, B = host.size(0)).
            A tensor alpha that requires grad receives ``sum over the sample of g * (seed - host)``
            in its own shape and dtype, zero for a value outside [0, 1] (torch.clamp's rule, on
            alpha's own value: a float64 1 + 2**-30 is outside even on float32 data).
        detach_host: when True (the default) no gradient flows to ``host``.

    Returns a new tensor in host's memory format. The output, d_host and d_seed are bit for bit
    those of the original ``torch.lerp`` and its autograd (for a float alpha, d_host scales by
    1 - alpha formed in double, as torch does); d_alpha is a float32 (float64 for float64 data)
    sum in a fixed order. Second-order gradients are supported. Raises ValueError for
    mismatched or unsupported inputs. Under torch.compile a float alpha is a constant of the graph; pass a
    0-dim tensor when it changes every step.
    """
    _check_pair(host, seed, "blend")
    if isinstance(alpha, torch.Tensor):
        _check_alpha(alpha, host)
        alpha_tensor, alpha_value = alpha, 0.0
    else:
        alpha_tensor, alpha_value = None, _clamp_unit(float(alpha))
    if using_reference():
        return blend_reference(host, seed, alpha, detach_host)
    if detach_host:
        host = host.detach()
    return _blend_forward_op(host, seed, alpha_tensor, alpha_value)


def ste(host: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator: the value of ``host`` (bit for bit, NaN and -0.0 included),
    with the incoming gradient passed unchanged to both ``host`` and ``seed``. The result never
    aliases ``host``: writing one leaves the other as it was."""
    _check_pair(host, seed, "ste")
    if using_reference():
        return ste_reference(host, seed)
    return _ste_forward_op(host, seed)


# ---------------------------------------------------------------- argument checks


def _clamp_unit(value: float) -> float:
    # The reference's clamp, NaN included (min/max keep the first argument on NaN).
    return max(0.0, min(1.0, value))


def _check_pair(host, seed, op: str) -> None:
    if not isinstance(host, torch.Tensor) or not isinstance(seed, torch.Tensor):
        raise ValueError(f"esper_fast.{op}: host and seed must be tensors")
    if host.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"esper_fast.{op}: host must be float32, float16, bfloat16 or float64, got {host.dtype}")
    if seed.dtype != host.dtype:
        raise ValueError(f"esper_fast.{op}: seed has dtype {seed.dtype} but host has dtype {host.dtype}")
    if seed.device != host.device:
        raise ValueError(f"esper_fast.{op}: seed is on {seed.device} but host is on {host.device}")
    if seed.shape != host.shape:
        raise ValueError(
            f"esper_fast.{op}: seed has shape {tuple(seed.shape)} but host has shape {tuple(host.shape)}"
        )


def _check_alpha(alpha: torch.Tensor, host: torch.Tensor) -> None:
    if alpha.device != host.device:
        raise ValueError(f"esper_fast.blend: alpha is on {alpha.device} but host is on {host.device}")
    if not alpha.dtype.is_floating_point:
        raise ValueError(f"esper_fast.blend: alpha must be a floating point tensor, got {alpha.dtype}")
    if _alpha_groups(alpha, host) is None:
        batch = host.shape[0] if host.dim() >= 1 else 1
        raise ValueError(
            f"esper_fast.blend: alpha of shape {tuple(alpha.shape)} does not broadcast over the batch "
            f"dimension of host of shape {tuple(host.shape)}; expected [], [1], [{batch}] or [{batch}, 1, ..., 1]"
        )


def _alpha_groups(alpha: torch.Tensor, like: torch.Tensor):
    """Number of alpha values the kernels apply (1, or the batch size), None if alpha does not fit."""
    if alpha.numel() == 1:
        return 1
    if like.dim() >= 1 and alpha.dim() >= 1 and alpha.shape[0] == like.shape[0] and all(
        size == 1 for size in alpha.shape[1:]
    ):
        return like.shape[0]
    return None


def _dense_format(t: torch.Tensor) -> torch.memory_format:
    """The memory format the kernels compute in (mirrors ``dense_format`` in csrc/blend.h)."""
    if t.is_contiguous():
        return torch.contiguous_format
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


# ---------------------------------------------------------------- fake (meta) kernels


@torch.library.register_fake("esper_fast::blend_forward")
def _blend_forward_fake(host, seed, alpha, alpha_value):
    _check_pair(host, seed, "blend_forward")
    if alpha is not None:
        _check_alpha(alpha, host)
    return torch.empty(host.shape, dtype=host.dtype, device=host.device, memory_format=_dense_format(host))


@torch.library.register_fake("esper_fast::blend_backward")
def _blend_backward_fake(grad_out, host, seed, alpha, alpha_value, need_host_grad, need_seed_grad, need_alpha_grad):
    if need_alpha_grad and (host is None or seed is None or alpha is None):
        raise ValueError("esper_fast.blend_backward: need_alpha_grad needs host, seed and alpha")
    if alpha is not None:
        _check_alpha(alpha, grad_out)
    format_ = _dense_format(grad_out)
    none = grad_out.new_empty((0,))

    def like_grad():
        return torch.empty(grad_out.shape, dtype=grad_out.dtype, device=grad_out.device, memory_format=format_)

    d_host = like_grad() if need_host_grad else none
    d_seed = like_grad() if need_seed_grad else none
    d_alpha = alpha.new_empty(alpha.shape) if need_alpha_grad else none
    return d_host, d_seed, d_alpha


@torch.library.register_fake("esper_fast::ste_forward")
def _ste_forward_fake(host, seed):
    _check_pair(host, seed, "ste_forward")
    return torch.empty(host.shape, dtype=host.dtype, device=host.device, memory_format=_dense_format(host))
