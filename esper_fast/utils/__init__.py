"""Shared utilities: dataset loaders."""

from esper_fast.utils.data import load_cifar10, load_tinystories

__all__ = ["load_cifar10", "load_tinystories"]
