"""The judgement of the candidates incubating in a slot: one validation pass that measures,
per candidate, the model with that candidate blended in at alpha 1 alone, and the model with
none (the other slots as they are).

The pass shares what the configurations have in common. Per batch the host runs once up to
the slot, each candidate once on those features, and the rest of the host once on every
configuration's features stacked along the batch; the stacked logits go to one
:class:`~esper_fast.ops.StackedMetricsAccumulator` launch (no device-to-host read until the
end). A host that cannot be split at the slot, or a model that mixes the rows of a batch in
eval, is measured by one ordinary forward per configuration instead
(:func:`judge_candidates_each`, which is also what the shared pass must equal).

A candidate's **value** is what it adds over none: accuracy points for a classifier, the
validation loss it removes for a language model (nats; positive helps). The winner has the
highest value (:func:`winner_of`); between equal values the lower validation loss wins (for a
language model the higher accuracy), then the candidate named first (the order of
:attr:`~esper_fast.kasmina.slot.SeedSlot.candidates`: the order the blueprints were given).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from esper_fast.tolaria.batches import BatchIterable, to_device
from esper_fast.tolaria.passes import ConfigurationsPass, ValidationSpec, evaluating

__all__ = ["CandidateValue", "Judgement", "judge_candidates", "judge_candidates_each", "winner_of"]


@dataclasses.dataclass(frozen=True)
class CandidateValue:
    """One candidate's measurement: the model with it at alpha 1, and its value over none."""

    seed_id: str
    blueprint: str
    accuracy: float   # validation accuracy (%) with this candidate blended in at alpha 1
    loss: float       # validation loss with it
    value: float      # accuracy points it adds, or (lm) the loss it removes

    def to_log(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Judgement:
    """The measurements of one judgement and its winner (see the module docstring)."""

    slot_id: str
    task_type: str
    baseline_accuracy: float   # the model with none of the candidates
    baseline_loss: float
    candidates: tuple[CandidateValue, ...]

    @property
    def winner(self) -> CandidateValue:
        return winner_of(self.candidates, self.task_type)

    def value_of(self, seed_id: str) -> CandidateValue:
        return next(c for c in self.candidates if c.seed_id == seed_id)

    def to_log(self) -> dict:
        return {
            "slot": self.slot_id,
            "baseline_accuracy": self.baseline_accuracy,
            "baseline_loss": self.baseline_loss,
            "candidates": [c.to_log() for c in self.candidates],
            "winner": self.winner.seed_id,
        }


def winner_of(candidates, task_type: str = "classification") -> CandidateValue:
    """The candidate with the highest value. Ties: for a classifier the lower validation loss
    wins, for a language model the higher accuracy; then the candidate named first. A NaN
    measurement ranks below every number."""
    def rank(candidate: CandidateValue) -> tuple:
        second = -candidate.loss if candidate.loss == candidate.loss else -float("inf")
        if task_type != "lm":
            return (_number(candidate.value), second)
        return (_number(candidate.value), _number(candidate.accuracy))
    best = candidates[0]
    for candidate in candidates[1:]:
        if rank(candidate) > rank(best):
            best = candidate
    return best


def _number(value: float) -> float:
    return value if value == value else -float("inf")


def judge_candidates(model: nn.Module, slot_id: str, loader: BatchIterable, criterion: nn.Module, device: str,
                     task_type: str = "classification") -> Judgement:
    """Measure every candidate in the slot at ``slot_id`` (``model``: a
    :class:`~esper_fast.kasmina.host.MorphogeneticModel`) over ``loader`` in one shared pass
    (see the module docstring). ValueError for a slot without candidates or an empty loader."""
    return _judge(model, slot_id, loader, criterion, device, task_type, shared=_shares_the_prefix(model))


def judge_candidates_each(model: nn.Module, slot_id: str, loader: BatchIterable, criterion: nn.Module, device: str,
                          task_type: str = "classification") -> Judgement:
    """:func:`judge_candidates` by brute force: one ordinary forward of the model per
    configuration and batch, with the candidate leading the slot at alpha 1 (or alpha forced to
    0 for none)."""
    return _judge(model, slot_id, loader, criterion, device, task_type, shared=False)


def _judge(model, slot_id: str, loader, criterion, device: str, task_type: str, *, shared: bool) -> Judgement:
    slot = model.slot(slot_id)
    candidates = slot.candidates
    if not candidates:
        raise ValueError(f"judge_candidates: slot {slot_id} holds no seed to judge")
    spec = ValidationSpec(criterion, device, task_type, per_class=False, num_classes=None)
    # The brute force keeps a pass per configuration (and evaluates any criterion itself).
    measured = ConfigurationsPass(spec, len(candidates) + 1, stack=shared)
    with evaluating(model):
        for batch in loader:
            inputs, labels = to_device(batch, device)
            if shared:
                features = model.host.forward_to_slot(inputs, slot_id)
                joined = [features]
                for candidate in candidates:
                    with slot.leading(candidate.seed_id), slot.force_alpha(1.0):
                        joined.append(slot(features))
                outputs = model.host.forward_from_slot(torch.cat(joined), slot_id)
                count = len(joined)
            else:
                each = [model(inputs) for _ in _each_configuration(slot, candidates)]
                outputs, count = torch.cat(each), len(each)
            measured.add(outputs, list(range(count)), labels)
    results, _ = measured.read(None, 0)
    return _judgement(slot_id, task_type, candidates, results)


def _each_configuration(slot, candidates):
    """Yields once per configuration with the slot set up for it: none, then each candidate."""
    with slot.force_alpha(0.0):
        yield None
    for candidate in candidates:
        with slot.leading(candidate.seed_id), slot.force_alpha(1.0):
            yield candidate


def _shares_the_prefix(model: nn.Module) -> bool:
    # The configuration walk's own condition: the split runs the forward's operations (the
    # segment contract, no hooks) and the rows of a batch are independent in eval.
    return callable(getattr(type(model), "_runs_tree", None)) and model._runs_tree(1)


def _judgement(slot_id: str, task_type: str, candidates, results) -> Judgement:
    if results[0] is None:
        raise ValueError("judge_candidates: the loader gave no batch")
    none = results[0]
    values = []
    for candidate, result in zip(candidates, results[1:]):
        value = none.loss - result.loss if task_type == "lm" else result.accuracy - none.accuracy
        values.append(CandidateValue(candidate.seed_id, candidate.blueprint_id, result.accuracy, result.loss, value))
    return Judgement(slot_id, task_type, none.accuracy, none.loss, tuple(values))
