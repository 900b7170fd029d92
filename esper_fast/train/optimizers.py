"""The run's optimizers: the host's, and one per seed (so that a cull drops only its seed's
state), all at the learning rate of the epoch (a cosine decay over the run)."""

from __future__ import annotations

import math
from typing import Iterable

import torch


def make_optimizer(params: Iterable, task_type: str, lr: float) -> torch.optim.Optimizer:
    """AdamW for a language model, SGD with momentum otherwise, over the trainable ``params``."""
    params = [p for p in params if p.requires_grad]
    if task_type == "lm":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)


def cosine_lr(base: float, epoch: int, epochs: int) -> float:
    """Cosine decay over the run (epoch is 1-based), so the last epochs settle."""
    return base * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / epochs))


class SeedOptimizers:
    """The seeds' optimizers stepped as one: what tolaria's trainer functions take as their
    ``seed_optimizer``."""

    def __init__(self, optimizers: Iterable[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()


class RunOptimizers:
    """The host's optimizer (``host``) and the seeds' (``seeds``: slot id -> the optimizer of
    the seed there, in the host's order; ``rivals``: slot id -> seed id -> the optimizer of
    each rival candidate incubating beside it). ``controllers``: the run's
    :class:`~esper_fast.train.controller.SlotControllers`, which say which slots hold a seed.
    Every candidate has an optimizer of its own, so the winner of a judgement goes on with
    exactly the optimizer state of its own run."""

    def __init__(self, host_parameters: Iterable, controllers, task_type: str, lr: float):
        self.controllers, self.task_type, self.base_lr = controllers, task_type, lr
        self.host = make_optimizer(host_parameters, task_type, lr)
        self.seeds: dict[str, torch.optim.Optimizer] = {}
        self.rivals: dict[str, dict[str, torch.optim.Optimizer]] = {}

    def seed_optimizer(self, slot_id: str, lr: float | None = None) -> torch.optim.Optimizer:
        """A new optimizer over the parameters of the seed in ``slot_id`` (at ``lr``, default
        the run's peak learning rate)."""
        parameters = self.controllers.by_slot[slot_id].seed_parameters()
        return make_optimizer(parameters, self.task_type, self.base_lr if lr is None else lr)

    def rival_optimizer(self, slot_id: str, seed_id: str, lr: float | None = None) -> torch.optim.Optimizer:
        """A new optimizer over the parameters of the rival candidate ``seed_id`` in ``slot_id``."""
        parameters = self.controllers.by_slot[slot_id].rival_parameters()[seed_id]
        return make_optimizer(parameters, self.task_type, self.base_lr if lr is None else lr)

    def set_learning_rate(self, epoch: int, epochs: int) -> float:
        """The learning rate of ``epoch`` set on every optimizer, a seed's optimizer made for
        each slot that holds a seed and has none; returns it."""
        lr = cosine_lr(self.base_lr, epoch, epochs)
        kept, self.seeds = self.seeds, {}
        kept_rivals, self.rivals = self.rivals, {}
        for slot_id, controller in self.controllers.by_slot.items():  # in the host's order
            if controller.stage is not None:
                self.seeds[slot_id] = kept[slot_id] if slot_id in kept else self.seed_optimizer(slot_id, lr)
            for seed_id in controller.rival_parameters():
                known = kept_rivals.get(slot_id, {}).get(seed_id)
                self.rivals.setdefault(slot_id, {})[seed_id] = known or self.rival_optimizer(slot_id, seed_id, lr)
        for optimizer in (self.host, *self.seeds.values(), *self.rival_optimizers()):
            for group in optimizer.param_groups:
                group["lr"] = lr
        return lr

    def rival_optimizers(self) -> list[torch.optim.Optimizer]:
        return [optimizer for by_seed in self.rivals.values() for optimizer in by_seed.values()]

    def drop_empty(self) -> None:
        """Forgets the optimizer of every slot whose seed is gone, and after a judgement those
        of the candidates that lost (the winner's becomes the slot's)."""
        for slot_id, controller in self.controllers.by_slot.items():
            if controller.stage is None:
                self.seeds.pop(slot_id, None)
            if slot_id in self.rivals and not controller.slot.has_rivals:
                rivals = self.rivals.pop(slot_id)
                state = controller.slot.state
                if state is not None and state.seed_id in rivals:
                    self.seeds[slot_id] = rivals[state.seed_id]

    def forget_seeds(self) -> None:
        """Forgets every seed's optimizer (a rollback culls every live seed)."""
        self.seeds, self.rivals = {}, {}

    def stepped(self) -> SeedOptimizers:
        """The seeds' optimizers as one, for the trainer functions."""
        return SeedOptimizers([*self.seeds.values(), *self.rival_optimizers()])
