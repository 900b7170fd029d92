"""Quality gates G0-G5: the checks a seed must pass to enter each lifecycle stage.

| gate | entering     | passes when                                                                  |
|------|--------------|------------------------------------------------------------------------------|
| G0   | GERMINATED   | the seed has a seed_id and a blueprint_id                                     |
| G1   | TRAINING     | the seed is GERMINATED                                                        |
| G2   | BLENDING     | the training improvement (by default the accuracy's rise in the stage, in     |
|      |              | points) >= min_training_improvement, isolation violations <=                  |
|      |              | max_isolation_violations, >= min_training_epochs epochs in the stage, and     |
|      |              | seed_gradient_norm_ratio >= min_seed_gradient_ratio                           |
| G3   | SHADOWING    | >= min_blending_epochs epochs of blending and alpha >= alpha_complete_threshold|
| G4   | PROBATIONARY | the seed is SHADOWING                                                         |
| G5   | FOSSILIZED   | a counterfactual contribution was measured, is > min_fossilize_contribution,  |
|      |              | and the seed is healthy                                                       |

A target stage without a gate of its own (CULLED and the recycling stages) is checked by G0,
as in the original. Check names carry the measured numbers (``global_improvement_1.25%``).

G2's training improvement is read through :meth:`QualityGates.training_improvement`, the one
hook a subclass may override to measure it otherwise: a language model's run judges it by
the validation loss's relative fall (``loss_improvement_1.23%``, see
:class:`esper_fast.train.controller.LossImprovementGates`). The default is the accuracy rise.
"""

from __future__ import annotations

from esper_fast.leyline import GateLevel, GateResult, SeedStage

__all__ = ["QualityGates", "GateLevel", "GateResult", "GATE_FOR_STAGE"]

GATE_FOR_STAGE = {
    SeedStage.GERMINATED: GateLevel.G0,
    SeedStage.TRAINING: GateLevel.G1,
    SeedStage.BLENDING: GateLevel.G2,
    SeedStage.SHADOWING: GateLevel.G3,
    SeedStage.PROBATIONARY: GateLevel.G4,
    SeedStage.FOSSILIZED: GateLevel.G5,
}


def _verdict(gate: GateLevel, passed_names: list[str], failed_names: list[str], **extra) -> GateResult:
    return GateResult(gate=gate, passed=not failed_names, checks_passed=passed_names, checks_failed=failed_names, **extra)


class QualityGates:
    """The gate checks for stage transitions (see the module table).

    The first six arguments are the original's (``min_shadowing_correlation`` and
    ``min_probation_stability`` are kept for it and not read by any gate). The keyword-only
    ones make the original's fixed choices adjustable; their defaults are those choices.
    """

    def __init__(
        self,
        min_training_improvement: float = 0.5,
        min_blending_epochs: int = 3,
        max_isolation_violations: int = 10,
        min_shadowing_correlation: float = 0.9,
        min_probation_stability: float = 0.95,
        min_seed_gradient_ratio: float = 0.05,
        *,
        alpha_complete_threshold: float = 0.95,
        min_fossilize_contribution: float = 0.0,
        min_training_epochs: int | None = None,
    ):
        self.min_training_improvement = min_training_improvement
        self.min_blending_epochs = min_blending_epochs
        self.max_isolation_violations = max_isolation_violations
        self.min_shadowing_correlation = min_shadowing_correlation
        self.min_probation_stability = min_probation_stability
        self.min_seed_gradient_ratio = min_seed_gradient_ratio
        self.alpha_complete_threshold = alpha_complete_threshold
        self.min_fossilize_contribution = min_fossilize_contribution
        # None: a seed must have trained as long as blending lasts (the original's reuse).
        self.min_training_epochs = min_training_epochs

    def check_gate(self, state, target_stage: SeedStage) -> GateResult:
        """Whether ``state`` may enter ``target_stage``."""
        checks = {
            GateLevel.G0: self._check_g0,
            GateLevel.G1: self._check_g1,
            GateLevel.G2: self._check_g2,
            GateLevel.G3: self._check_g3,
            GateLevel.G4: self._check_g4,
            GateLevel.G5: self._check_g5,
        }
        level = self._get_gate_level(target_stage)
        check = checks.get(level)
        if check is None:  # a level a subclass added: passes, as in the original
            return GateResult(gate=level, passed=True, score=1.0)
        return check(state)

    def _get_gate_level(self, target_stage: SeedStage) -> GateLevel:
        return GATE_FOR_STAGE.get(target_stage, GateLevel.G0)

    def _seed_ready_for_blending(self, state) -> bool:
        """The seed itself has trained long enough in TRAINING to be worth blending."""
        required = self.min_blending_epochs if self.min_training_epochs is None else self.min_training_epochs
        return state.metrics.epochs_in_current_stage >= required

    def _check_g0(self, state) -> GateResult:
        passed, failed = [], []
        (passed if state.seed_id else failed).append("seed_id_present" if state.seed_id else "seed_id_missing")
        (passed if state.blueprint_id else failed).append(
            "blueprint_id_present" if state.blueprint_id else "blueprint_id_missing"
        )
        ok = not failed
        return _verdict(
            GateLevel.G0, passed, failed, score=1.0 if ok else 0.0,
            message="Germination gate" if ok else "Missing required fields",
        )

    def _check_g1(self, state) -> GateResult:
        ok = state.stage == SeedStage.GERMINATED
        return _verdict(
            GateLevel.G1, ["germinated"] if ok else [], [] if ok else ["not_germinated"],
            score=1.0 if ok else 0.0, message="Ready for training" if ok else "Not germinated",
        )

    def training_improvement(self, state) -> tuple[float, str]:
        """G2's training improvement, compared with ``min_training_improvement``: (its value,
        in percent, the name of its check). By default the validation accuracy's rise in the
        stage (points), named ``global_improvement``; a subclass may measure it otherwise.
        The check reads ``{name}_1.25%`` when it passes, ``{name}_insufficient_0.10%`` when not."""
        return state.metrics.improvement_since_stage_start, "global_improvement"

    def _check_g2(self, state) -> GateResult:
        metrics = state.metrics
        improvement, name = self.training_improvement(state)
        ratio = metrics.seed_gradient_norm_ratio
        passed, failed = [], []
        if improvement >= self.min_training_improvement:
            passed.append(f"{name}_{improvement:.2f}%")
        else:
            failed.append(f"{name}_insufficient_{improvement:.2f}%")
        if metrics.isolation_violations <= self.max_isolation_violations:
            passed.append("isolation_ok")
        else:
            failed.append(f"isolation_violations_{metrics.isolation_violations}")
        if self._seed_ready_for_blending(state):
            passed.append("seed_ready")
        else:
            failed.append("seed_not_ready")
        # The seed must be learning itself (gradient activity), not riding the host's gains.
        if ratio >= self.min_seed_gradient_ratio:
            passed.append(f"seed_gradient_active_{ratio:.2f}")
        else:
            failed.append(f"seed_gradient_low_{ratio:.2f}")
        return _verdict(
            GateLevel.G2, passed, failed,
            score=min(1.0, improvement / 5.0) if improvement > 0 else 0.0,
            message=f"Improvement: {improvement:.2f}%",
        )

    def _check_g3(self, state) -> GateResult:
        epochs = state.metrics.epochs_in_current_stage
        passed, failed = [], []
        if epochs >= self.min_blending_epochs:
            passed.append("blending_complete")
        else:
            failed.append(f"blending_incomplete_{epochs}")
        if state.alpha >= self.alpha_complete_threshold:
            passed.append("alpha_high")
        else:
            failed.append(f"alpha_low_{state.alpha:.2f}")
        return _verdict(GateLevel.G3, passed, failed, score=state.alpha)

    def _check_g4(self, state) -> GateResult:
        ok = state.stage == SeedStage.SHADOWING
        return _verdict(
            GateLevel.G4, ["shadowing_complete"] if ok else [], [] if ok else ["shadowing_incomplete"],
            score=1.0 if ok else 0.0,
        )

    def _check_g5(self, state) -> GateResult:
        # Fossilizing is permanent: it needs a measured counterfactual, with no fallback.
        contribution = state.metrics.counterfactual_contribution
        if contribution is None:
            return _verdict(GateLevel.G5, [], ["counterfactual_not_available"], score=0.0)
        passed, failed = [], []
        if contribution > self.min_fossilize_contribution:
            passed.append(f"positive_contribution_{contribution:.2f}%")
        else:
            failed.append("non_positive_contribution")
        (passed if state.is_healthy else failed).append("healthy" if state.is_healthy else "unhealthy")
        return _verdict(
            GateLevel.G5, passed, failed, score=min(1.0, contribution / 10.0) if contribution > 0 else 0.0
        )
