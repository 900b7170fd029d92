"""Gate G2 (TRAINING -> BLENDING) of a language model reads the validation loss: the seed
passes when the loss fell by min_training_improvement percent (relative) during the stage,
whatever the accuracy did; a classifier's G2 still reads the accuracy's rise, unchanged; the
loss G2 measures from survives a checkpoint (and a stop mid-stage resumes to the same run)."""

import dataclasses

import pytest

from esper_fast.kasmina import GateLevel, QualityGates, SeedStage as S
from esper_fast.kasmina.slot import SeedMetrics, SeedState
from esper_fast.train import LifecycleSchedule, SeedController
from esper_fast.train.controller import LossImprovementGates
from cli_helpers import in_process, outcome, read_log
from esper_fast import train

EPOCHS = 8  # for_epochs(8): germinate after epoch 2, TRAINING 3, BLENDING 4-5, SHADOWING 6, PROBATIONARY 7
FLAT = [20.0] * EPOCHS  # a language model's accuracy that does not move


def _training_state(**metrics):
    return SeedState(seed_id="seed-1", blueprint_id="lora", stage=S.TRAINING,
                     metrics=SeedMetrics(epochs_in_current_stage=3, **metrics))


# ---------------------------------------------------------------- the gates


def test_the_training_improvement_is_a_hook_the_default_reads_the_accuracy():
    state = _training_state(current_val_accuracy=41.0, accuracy_at_stage_start=40.0)
    assert QualityGates().training_improvement(state) == (1.0, "global_improvement")

    class Custom(QualityGates):
        def training_improvement(self, state):
            return 2.0, "custom_gain"

    result = Custom(min_seed_gradient_ratio=0.0).check_gate(state, S.BLENDING)
    assert result.gate == GateLevel.G2 and result.passed
    assert result.checks_passed[0] == "custom_gain_2.00%" and result.score == pytest.approx(0.4)
    assert result.message == "Improvement: 2.00%"


@pytest.mark.parametrize("start,now,passed,check", [
    (4.0, 3.9, True, "loss_improvement_2.50%"),
    (4.0, 3.996, False, "loss_improvement_insufficient_0.10%"),
    (4.0, 4.4, False, "loss_improvement_insufficient_-10.00%"),
    (None, None, False, "loss_improvement_insufficient_0.00%"),   # no loss measured
])
def test_loss_gates_judge_g2_by_the_relative_fall_of_the_loss(start, now, passed, check):
    gates = LossImprovementGates(min_seed_gradient_ratio=0.0)
    gates.loss_at_stage_start, gates.current_loss = start, now
    # The accuracy rose 5 points, which would pass a classifier's G2: it is not read here.
    state = _training_state(current_val_accuracy=45.0, accuracy_at_stage_start=40.0)
    result = gates.check_gate(state, S.BLENDING)
    assert result.passed is passed
    assert result.checks_passed == ([check] if passed else []) + ["isolation_ok", "seed_ready",
                                                                  "seed_gradient_active_0.00"]
    assert result.checks_failed == ([] if passed else [check])
    # The other checks are still the default gates': too few epochs in the stage holds it.
    gates.loss_at_stage_start, gates.current_loss = 4.0, 3.0
    early = gates.check_gate(dataclasses.replace(state, metrics=SeedMetrics(epochs_in_current_stage=0)), S.BLENDING)
    assert early.checks_failed == ["seed_not_ready"] and "loss_improvement_25.00%" in early.checks_passed


def test_the_loss_baseline_is_the_stage_s_start_and_an_old_checkpoint_takes_the_next_loss():
    gates = LossImprovementGates()
    gates.record_loss(None)
    assert (gates.loss_at_stage_start, gates.current_loss, gates.loss_fall()) == (None, None, 0.0)
    gates.record_loss(4.0)  # no baseline yet: the first loss is it
    gates.record_loss(3.0)
    assert gates.loss_at_stage_start == 4.0 and gates.loss_fall() == 25.0
    gates.start_stage()
    assert gates.loss_at_stage_start == 3.0 and gates.loss_fall() == 0.0


# ---------------------------------------------------------------- the controllers


def _controller(task_type):
    from esper_fast.tolaria import create_model

    model = create_model("cifar10", "cpu")
    return SeedController(model, "conv_light", LifecycleSchedule.for_epochs(EPOCHS), EPOCHS, steps_per_epoch=2,
                          task_type=task_type)


def _spy_g2(controller, monkeypatch):
    """Every G2 result the controller's gates give, in order."""
    results = []
    check_gate = controller.gates.check_gate

    def spy(state, target):
        result = check_gate(state, target)
        if result.gate == GateLevel.G2:
            results.append(result)
        return result

    monkeypatch.setattr(controller.gates, "check_gate", spy)
    return results


def _drive(controller, accuracies, losses, first_epoch=1):
    events = []
    for epoch, (accuracy, loss) in enumerate(zip(accuracies, losses), start=first_epoch):
        if controller.stage == S.BLENDING:
            for step in range(controller.steps_per_epoch):
                controller.before_blend_batch(step)
        events += [f"{epoch}: {e}" for e in controller.end_epoch(epoch, accuracy, None, val_loss=loss)]
    return events


def test_a_language_model_seed_passes_g2_when_the_loss_fell_though_the_accuracy_did_not(monkeypatch):
    controller = _controller("lm")
    assert controller.slot.gates is controller.gates and isinstance(controller.gates, LossImprovementGates)
    g2 = _spy_g2(controller, monkeypatch)
    events = _drive(controller, FLAT[:3], [5.0, 4.0, 3.9])
    assert events[0].startswith("2: germinated seed-1 (conv_light)")
    assert events[-1] == "3: TRAINING -> BLENDING" and controller.stage == S.BLENDING
    assert [r.checks_passed for r in g2] == [["loss_improvement_2.50%", "isolation_ok", "seed_ready",
                                              "seed_gradient_active_0.00"]]
    # Entering BLENDING starts a new stage: its loss is the new baseline.
    assert controller.gates.loss_at_stage_start == 3.9


def test_a_language_model_seed_is_held_at_g2_while_the_loss_stalls_and_culled_at_the_timeout(monkeypatch):
    controller = _controller("lm")
    g2 = _spy_g2(controller, monkeypatch)
    # The accuracy climbs 10 points an epoch (a classifier's G2 would pass); the loss barely falls.
    events = _drive(controller, [20.0, 30.0, 40.0, 50.0, 60.0, 70.0], [5.0, 4.0, 3.996, 3.992, 3.988, 3.98])
    held = [e for e in events if "gate held" in e]
    assert held == ["3: gate held TRAINING -> BLENDING (loss_improvement_insufficient_0.10%)",
                    "4: gate held TRAINING -> BLENDING (loss_improvement_insufficient_0.20%)",
                    "5: gate held TRAINING -> BLENDING (loss_improvement_insufficient_0.30%)"]
    assert "5: seed-1 culled: gate_timeout (held 3 epochs before BLENDING)" in events
    assert controller.stage is None and controller.seeds[0].reason == "gate_timeout"
    assert all(not r.passed for r in g2) and len(g2) == 3


def test_the_fall_is_counted_from_the_stage_s_start_across_held_epochs():
    controller = _controller("lm")
    # Held once at 0.25%, then the loss has fallen 0.75% since TRAINING began: it passes.
    events = _drive(controller, FLAT[:4], [5.0, 4.0, 3.99, 3.97])
    assert events[-2:] == ["3: gate held TRAINING -> BLENDING (loss_improvement_insufficient_0.25%)",
                           "4: TRAINING -> BLENDING"]


def test_a_classifier_s_g2_still_reads_the_accuracy_and_ignores_the_loss(monkeypatch):
    controller = _controller("classification")
    assert type(controller.gates) is QualityGates and controller.slot.gates is controller.gates
    g2 = _spy_g2(controller, monkeypatch)
    # The loss falls a lot, the accuracy does not move: held, by the accuracy, as before.
    events = _drive(controller, FLAT[:3], [5.0, 4.0, 3.0])
    assert events[-1] == "3: gate held TRAINING -> BLENDING (global_improvement_insufficient_0.00%)"
    # With or without losses, the same decisions and the same state (no loss kept).
    again = _controller("classification")
    assert _drive(again, FLAT[:3], [None] * 3) == events
    assert again.state_dict() == controller.state_dict()
    assert set(controller.state_dict()) == {"seeds", "epochs_in_stage", "gate_holds", "host_epochs",
                                            "best_accuracy", "blend_step"}
    rising = _controller("classification")
    assert _drive(rising, [20.0, 20.0, 21.0], [5.0, 5.0, 5.0])[-1] == "3: TRAINING -> BLENDING"
    assert [r.checks_failed for r in g2] == [["global_improvement_insufficient_0.00%"]]


def test_the_loss_baseline_survives_the_state_dict_and_an_older_one_loads():
    controller = _controller("lm")
    _drive(controller, FLAT[:2], [5.0, 4.0])  # germinated: TRAINING from loss 4.0
    state = controller.state_dict()
    assert (state["loss_at_stage_start"], state["current_loss"]) == (4.0, 4.0)

    # A controller built afresh over the same model (as a resumed run is) goes on the same way.
    resumed = SeedController(controller.model, "conv_light", controller.schedule, EPOCHS, steps_per_epoch=2,
                             task_type="lm")
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state and controller.model.slot(None).gates is resumed.gates
    assert _drive(resumed, [20.0], [3.9], first_epoch=3) == ["3: TRAINING -> BLENDING"]

    # A checkpoint written before G2 read the loss has no baseline: the next loss becomes it.
    older = _controller("lm")
    _drive(older, FLAT[:2], [5.0, 4.0])
    legacy = {k: v for k, v in older.state_dict().items() if k not in ("loss_at_stage_start", "current_loss")}
    again = SeedController(older.model, "conv_light", older.schedule, EPOCHS, steps_per_epoch=2, task_type="lm")
    again.load_state_dict(legacy)
    assert again.gates.loss_at_stage_start is None
    assert _drive(again, [20.0, 20.0], [3.9, 3.8], first_epoch=3) == [
        "3: gate held TRAINING -> BLENDING (loss_improvement_insufficient_0.00%)", "4: TRAINING -> BLENDING"]


# ---------------------------------------------------------------- a whole run, stopped and resumed

# Six epochs of a language model: germinate after 1, TRAINING 2, BLENDING 3, ... decided by 6.
LM = ["--task", "tinystories", "--epochs", "6", "--max-batches", "2", "--batch-size", "4", "--seq-len", "16",
      "--no-progress"]


def test_a_language_model_run_stopped_in_training_resumes_to_the_same_records(tmp_path):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert in_process(tmp_path, ["train", *LM, "--out", whole]) == 0
    epochs = [r for r in read_log(whole / train.METRICS_FILE) if r["type"] == "epoch"]
    assert epochs[1]["stage"] == "TRAINING" and "TRAINING -> BLENDING" in epochs[1]["events"]
    assert epochs[1]["val_loss"] < 0.995 * epochs[0]["val_loss"]
    # Stopped in the middle of the TRAINING epoch: G2 then needs the loss of epoch 1's end.
    assert in_process(tmp_path, ["train", *LM, "--out", stopped], signal_at="SIGTERM@2:1") == 143
    assert train.RunDir(stopped).checkpoints()[-1].name == "epoch-0001-step-0001.pt"
    assert in_process(tmp_path, ["train", "--resume", stopped]) == 0
    assert outcome(stopped) == outcome(whole)
