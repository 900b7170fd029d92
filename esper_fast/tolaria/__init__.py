"""Tolaria: the training loops, the counterfactual validation, the judgement of candidates and
the governor."""

from esper_fast.tolaria.environment import create_model
from esper_fast.tolaria.governor import GovernorReport, TolariaGovernor
from esper_fast.tolaria.judgement import CandidateValue, Judgement, judge_candidates
from esper_fast.tolaria.trainer import (
    AttributionResult,
    EpochValidation,
    SlotAttribution,
    slot_attribution,
    train_epoch_blended,
    train_epoch_incubator_mode,
    train_epoch_normal,
    validate_and_get_metrics,
    validate_epoch,
    validate_with_attribution,
)

__all__ = [
    "create_model",
    "train_epoch_normal",
    "train_epoch_incubator_mode",
    "train_epoch_blended",
    "validate_and_get_metrics",
    "validate_with_attribution",
    "AttributionResult",
    "validate_epoch",
    "EpochValidation",
    "slot_attribution",
    "SlotAttribution",
    "TolariaGovernor",
    "GovernorReport",
    "judge_candidates",
    "Judgement",
    "CandidateValue",
]
