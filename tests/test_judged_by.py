"""What a seed is judged by: accuracy points for a classifier, the validation loss it removes
for a language model; a value of exactly 0 is no measurable effect, not a negative one."""

import pytest

from esper_fast.leyline import SeedStage
from esper_fast.tolaria.attribution import MetricAttribution, SlotAttribution
from esper_fast.train import LifecycleSchedule, SeedController
from esper_fast.train.console import epoch_lines
from esper_fast.train.controller import SlotControllers
from esper_fast.train.report import EpochRecord, SlotRecord, seed_values
from test_train_slots import _controllers, _drive


def _lifecycle_values(value, error=None):
    # Germinated after epoch 3 (warm-up), TRAINING 4, BLENDING 5-6, SHADOWING 7, PROBATIONARY 8.
    return [{}] * 4 + [value] * 4


# A language model's validation loss, falling epoch by epoch (G2 reads its fall).
FALLING_LOSSES = [3.0, 2.8, 2.6, 2.4, 2.3, 2.2, 2.15, 2.1]


def _language_model_controllers():
    model, controllers = _controllers(("block2_post", "block3_post"))
    lm = SlotControllers(model, dict.fromkeys(controllers.by_slot, "conv_light"), controllers.main.schedule,
                         controllers.main.epochs, steps_per_epoch=2, task_type="lm")
    return model, lm


def test_a_language_model_seed_is_judged_by_the_loss_it_removes():
    _, controllers = _language_model_controllers()
    values = {"block2_post": {"shapley": 0.0, "loss_shapley": 0.0312},
              "block3_post": {"shapley": 0.0, "loss_shapley": -0.0021}}
    judged = controllers.judged(None, values)
    assert judged == {"block2_post": (0.0312, None), "block3_post": (-0.0021, None)}
    events = _drive(controllers, [30, 40, 45, 50, 55, 58, 60, 61], _lifecycle_values(judged), FALLING_LOSSES)
    first, second = controllers.by_slot["block2_post"], controllers.by_slot["block3_post"]
    assert first.stage == SeedStage.FOSSILIZED
    assert first.seeds[0].reason == "loss Shapley value +0.0312 nats"
    assert "block3_post: seed-2 culled: negative_shapley (loss Shapley value -0.0021 nats)" in events


@pytest.mark.parametrize("task_type", ["classification", "lm"])
def test_a_value_of_exactly_zero_is_no_measurable_effect(task_type):
    _, controllers = _controllers(("block2_post", "block3_post"))
    if task_type == "lm":
        _, controllers = _language_model_controllers()
    judged = {"block2_post": (0.0, None), "block3_post": (-0.5, None)}
    events = _drive(controllers, [30, 40, 45, 50, 55, 58, 60, 61], _lifecycle_values(judged), FALLING_LOSSES)
    assert controllers.by_slot["block2_post"].seeds[0].reason == "no_measurable_effect"
    assert controllers.by_slot["block3_post"].seeds[0].reason == "negative_shapley"
    unit = "+0.0000 nats" if task_type == "lm" else "+0.00 points"
    assert any(e.startswith("block2_post: seed-1 culled: no_measurable_effect (") and unit in e for e in events), events


def test_one_slot_language_model_reads_the_loss_drop():
    from esper_fast.tolaria import create_model

    model = create_model("cifar10", "cpu")
    controller = SeedController(model, "conv_light", LifecycleSchedule.for_epochs(8), 8, steps_per_epoch=2,
                                task_type="lm")
    assert controller._measured(0.01234, None) == "loss drop +0.0123 nats"
    assert controller._cull_reason(0.0) == "no_measurable_effect"
    assert controller._cull_reason(-0.1) == "negative_counterfactual"
    classifier = SeedController(model, "conv_light", LifecycleSchedule.for_epochs(8), 8, steps_per_epoch=2)
    assert classifier._measured(1.5, None) == "contribution +1.50 points"


def _attribution(exact=True):
    slots = ("a", "b")
    accuracy = MetricAttribution(values={}, shapley={"a": 0.0, "b": 0.0}, shapley_error={"a": 0.0, "b": 0.0},
                                 leave_one_out={"a": 0.0, "b": 0.0}, alone_on={"a": 0.0, "b": 0.0}, interactions={})
    loss = MetricAttribution(values={}, shapley={"a": -0.25, "b": 0.125}, shapley_error={"a": 0.01, "b": 0.02},
                             leave_one_out={"a": -0.2, "b": 0.1}, alone_on={"a": -0.3, "b": 0.1}, interactions={})
    return SlotAttribution(slots=slots, exact=exact, permutations=0 if exact else 8, accuracy=accuracy, loss=loss)


def test_the_record_of_a_language_model_slot_holds_the_loss_value_sign_turned():
    values = seed_values(_attribution(exact=False), ["a", "b"], "lm")
    assert values["a"]["loss_shapley"] == 0.25 and values["b"]["loss_shapley"] == -0.125
    assert values["a"]["loss_shapley_error"] == 0.01
    # A classifier's records are as they were: no loss value.
    assert "loss_shapley" not in seed_values(_attribution(), ["a", "b"])["a"]
    assert "loss_shapley_error" not in seed_values(_attribution(), ["a", "b"], "lm")["a"]


def _record(**fields):
    base = dict(epoch=5, stage="BLENDING", stage_after="BLENDING", seed_id="seed-1", blueprint="lora",
                alpha_start=0.2, alpha=0.5, lr=0.001, train_loss=2.5, train_accuracy=30.0, train_eval_loss=2.4,
                val_loss=2.45, val_accuracy=31.0, perplexity=11.59, per_class_accuracy=None,
                seed_contribution=0.0123, real_accuracy=31.0, baseline_accuracy=31.0, rollback=False, events=[],
                steps=10, started_at="", ended_at="", train_time_s=1.0, eval_time_s=1.0, epoch_time_s=2.0,
                samples_per_s=1.0)
    base.update(fields)
    return EpochRecord(**base)


def test_the_language_model_lines_show_the_loss_value_beside_perplexity():
    one = epoch_lines(_record(), 8, "lm")
    assert "ppl 11.59" in one[0] and "loss drop +0.0123 nats" in one[0] and "contribution" not in one[0]
    slot = SlotRecord(stage="BLENDING", stage_after="BLENDING", seed_id="seed-1", blueprint="lora", alpha_start=0.2,
                      alpha=0.5, shapley=0.0, leave_one_out=0.0, alone_on=0.0, loss_shapley=0.0312).to_log()
    several = epoch_lines(_record(slots={"layer_1_post_block": slot}), 8, "lm")
    assert any("loss Shapley value +0.0312 nats" in line for line in several), several
    assert all(len(line) <= 100 for line in several)
