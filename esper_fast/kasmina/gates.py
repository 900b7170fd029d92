"""Quality gates G0-G5: the checks a seed must pass to enter each lifecycle stage.

| gate | entering     | passes when                                                             |
|------|--------------|-------------------------------------------------------------------------|
| G0   | GERMINATED   | the seed has a seed_id and a blueprint_id                                |
| G1   | TRAINING     | the seed is GERMINATED                                                   |
| G2   | BLENDING     | accuracy improved >= min_training_improvement points in this stage, and  |
|      |              | the seed spent >= min_training_epochs epochs in it                       |
| G3   | SHADOWING    | >= min_blending_epochs epochs of blending and alpha >= alpha_complete    |
| G4   | PROBATIONARY | the seed is SHADOWING                                                    |
| G5   | FOSSILIZED   | the seed is healthy and helps: counterfactual_contribution >              |
|      |              | min_fossilize_contribution when measured, else total_improvement > 0     |

CULLED and the recycling stages have no gate. The thresholds are constructor arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from esper_fast.kasmina.stages import SeedStage


class GateLevel(IntEnum):
    G0 = 0
    G1 = 1
    G2 = 2
    G3 = 3
    G4 = 4
    G5 = 5


@dataclass
class GateResult:
    """The outcome of one gate check; ``checks_failed`` names every reason it did not pass."""

    gate: GateLevel
    passed: bool
    score: float = 0.0
    checks_passed: list[str] = field(default_factory=list)
    checks_failed: list[str] = field(default_factory=list)
    message: str = ""


# The gate guarding entry into each stage; stages not listed are entered without a gate.
GATE_FOR_STAGE = {
    SeedStage.GERMINATED: GateLevel.G0,
    SeedStage.TRAINING: GateLevel.G1,
    SeedStage.BLENDING: GateLevel.G2,
    SeedStage.SHADOWING: GateLevel.G3,
    SeedStage.PROBATIONARY: GateLevel.G4,
    SeedStage.FOSSILIZED: GateLevel.G5,
}


def _result(gate: GateLevel, checks: list[tuple[bool, str]], score: float | None = None, message: str = "") -> GateResult:
    passed_names = [name for ok, name in checks if ok]
    failed_names = [name for ok, name in checks if not ok]
    passed = not failed_names
    if score is None:
        score = 1.0 if passed else 0.0
    return GateResult(gate, passed, score, passed_names, failed_names, message)


class QualityGates:
    """Gate checks for stage transitions (see the module table)."""

    def __init__(
        self,
        min_training_improvement: float = 0.5,
        min_blending_epochs: int = 3,
        alpha_complete_threshold: float = 0.95,
        min_fossilize_contribution: float = 0.0,
        min_training_epochs: int | None = None,
    ):
        self.min_training_improvement = min_training_improvement
        self.min_blending_epochs = min_blending_epochs
        self.alpha_complete_threshold = alpha_complete_threshold
        self.min_fossilize_contribution = min_fossilize_contribution
        # The original reuses the blending dwell as the minimum training age.
        self.min_training_epochs = min_blending_epochs if min_training_epochs is None else min_training_epochs

    def gate_for(self, target_stage: SeedStage) -> GateLevel | None:
        return GATE_FOR_STAGE.get(SeedStage(target_stage))

    def check_gate(self, state, target_stage: SeedStage) -> GateResult:
        """Check whether ``state`` may enter ``target_stage``; ungated stages always pass."""
        gate = self.gate_for(target_stage)
        if gate is None:
            return GateResult(GateLevel.G0, True, 1.0, message=f"no gate guards {SeedStage(target_stage).name}")
        checks = {
            GateLevel.G0: self._check_g0,
            GateLevel.G1: self._check_g1,
            GateLevel.G2: self._check_g2,
            GateLevel.G3: self._check_g3,
            GateLevel.G4: self._check_g4,
            GateLevel.G5: self._check_g5,
        }
        return checks[gate](state)

    def _check_g0(self, state) -> GateResult:
        return _result(
            GateLevel.G0,
            [(bool(state.seed_id), "seed_id_present"), (bool(state.blueprint_id), "blueprint_id_present")],
            message="germination",
        )

    def _check_g1(self, state) -> GateResult:
        return _result(GateLevel.G1, [(state.stage == SeedStage.GERMINATED, "germinated")], message="training")

    def _check_g2(self, state) -> GateResult:
        metrics = state.metrics
        improvement = metrics.improvement_since_stage_start
        checks = [
            (improvement >= self.min_training_improvement, f"improvement_{improvement:.2f}"),
            (metrics.epochs_in_current_stage >= self.min_training_epochs, "seed_trained_long_enough"),
        ]
        score = min(1.0, improvement / 5.0) if improvement > 0 else 0.0
        return _result(GateLevel.G2, checks, score, message=f"improvement {improvement:.2f} points")

    def _check_g3(self, state) -> GateResult:
        epochs = state.metrics.epochs_in_current_stage
        checks = [
            (epochs >= self.min_blending_epochs, f"blending_epochs_{epochs}"),
            (state.alpha >= self.alpha_complete_threshold, f"alpha_{state.alpha:.2f}"),
        ]
        return _result(GateLevel.G3, checks, score=state.alpha, message="shadowing")

    def _check_g4(self, state) -> GateResult:
        return _result(GateLevel.G4, [(state.stage == SeedStage.SHADOWING, "shadowing_complete")], message="probation")

    def _check_g5(self, state) -> GateResult:
        metrics = state.metrics
        contribution = metrics.counterfactual_contribution
        if contribution is not None:
            helps = (contribution > self.min_fossilize_contribution, f"contribution_{contribution:.2f}")
            evidence = contribution
        else:
            helps = (metrics.total_improvement > 0, f"improvement_{metrics.total_improvement:.2f}")
            evidence = metrics.total_improvement
        checks = [helps, (state.is_healthy, "healthy")]
        score = min(1.0, evidence / 10.0) if evidence > 0 else 0.0
        return _result(GateLevel.G5, checks, score, message="fossilization")


__all__ = ["GateLevel", "GateResult", "QualityGates", "GATE_FOR_STAGE"]
