"""Helpers shared by the tests of seed slots: growing a seed to a stage, counting a module's calls."""

import torch.nn as nn

from esper_fast.kasmina import SeedStage

LIFECYCLE = [SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.SHADOWING, SeedStage.PROBATIONARY, SeedStage.FOSSILIZED]


def grow(model, slot_id, blueprint, stage, alpha, *, lora_std=1.0):
    """Germinate ``blueprint`` in ``slot_id`` and walk it to ``stage`` at ``alpha`` (stage None:
    leave the slot empty). A lora seed's zero-initialised projection, which changes nothing,
    is drawn from N(0, lora_std)."""
    if stage is None:
        return
    model.germinate_seed(blueprint, f"seed-{slot_id}", slot=slot_id)
    slot = model.slot(slot_id)
    for target in LIFECYCLE:
        if slot.state.stage >= stage:
            break
        assert slot.state.transition(target)
    slot.set_alpha(alpha)
    if blueprint == "lora":
        nn.init.normal_(slot.seed.up.weight, std=lora_std)


class Counter:
    """Counts the calls of a module and the rows it saw."""

    def __init__(self, module):
        self.calls, self.rows = 0, 0
        module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.calls += 1
        self.rows += inputs[0].shape[0]
