"""PLACEHOLDER until the blend kernels land: same signatures, reference math."""

from esper_fast.ops.reference import blend_reference, ste_reference


def blend(host, seed, alpha, detach_host=True):
    return blend_reference(host, seed, alpha, detach_host)


def ste(host, seed):
    return ste_reference(host, seed)
