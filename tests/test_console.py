"""What an epoch prints: a run of one slot prints the line it always printed; a run of
several slots prints a head line, then a line per slot naming what each number is and that
slot's events under it (the empty slots to which nothing happened named together), every
line within 100 columns whatever the number of slots; and a stopped run says where it
stopped."""

import pytest

from esper_fast.train.console import COLUMNS, epoch_lines, where_stopped
from esper_fast.train.report import EpochRecord

CIFAR_SLOTS = ("block2_post", "block3_post")
LM_SLOTS = tuple(f"layer_{i}_post_block" for i in range(6))


def record(**fields) -> EpochRecord:
    base = {"epoch": 7, "stage": "PROBATIONARY", "stage_after": "FOSSILIZED", "seed_id": "seed-1",
            "blueprint": "conv_light", "alpha_start": 1.0, "alpha": 1.0, "train_loss": 1.502934,
            "train_accuracy": 40.625, "val_accuracy": 40.3125, "seed_contribution": 2.8125,
            "rollback": False, "events": [], "epoch_time_s": 0.98}
    return EpochRecord.from_log({**base, **fields})


def slot(stage="BLENDING", seed_id="seed-1", alpha=1.0, **value) -> dict:
    return {"stage": stage, "stage_after": stage, "seed_id": None if stage == "NONE" else seed_id,
            "blueprint": "conv_light", "alpha_start": alpha, "alpha": alpha, "shapley": None, **value}


def test_a_one_slot_line_is_the_line_it_always_was():
    events = ["PROBATIONARY -> FOSSILIZED", "seed-1 fossilized (contribution +2.81 points)"]
    assert epoch_lines(record(events=events), 8, "classification") == [
        "epoch  7/8 | loss 1.5029 | val  40.3% (train  40.6%) | stage PROBATIONARY | alpha 1.00 | "
        "contribution  +2.81 | 1.0s | PROBATIONARY -> FOSSILIZED; seed-1 fossilized (contribution +2.81 points)"]
    assert epoch_lines(record(stage="NONE", seed_contribution=None, train_loss=None, perplexity=12.345), 8, "lm") == [
        "epoch  7/8 | loss nan | ppl 12.35 (train  40.6%) | stage NONE         | alpha 1.00 | loss drop       - nats "
        "| 1.0s"]


def test_two_slots_print_a_head_line_then_each_slot_labelled_with_its_events_under_it():
    events = ["block2_post: PROBATIONARY -> FOSSILIZED", "block2_post: seed-1 fossilized (Shapley value +26.88 points)",
              "block3_post: seed-2 culled: negative_shapley (Shapley value -0.31 points)"]
    slots = {"block2_post": slot("PROBATIONARY", shapley=26.875),
             "block3_post": slot("PROBATIONARY", "seed-2", shapley=-0.3125)}
    lines = epoch_lines(record(events=events, slots=slots, epoch=7, epoch_time_s=17.0), 10, "classification")
    assert lines == [
        "epoch  7/10 | loss 1.5029 | val  40.3% (train  40.6%) | 17.0s",
        "  block2_post  seed-1  PROBATIONARY  alpha 1.00  Shapley value +26.88 points",
        "      PROBATIONARY -> FOSSILIZED; seed-1 fossilized (Shapley value +26.88 points)",
        "  block3_post  seed-2  PROBATIONARY  alpha 1.00  Shapley value  -0.31 points",
        "      seed-2 culled: negative_shapley (Shapley value -0.31 points)",
    ]


def test_an_empty_slot_an_unmeasured_seed_and_an_event_of_no_slot():
    events = ["governor rollback (loss_spike, loss 1e+03): restored the last healthy epoch",
              "block2_post: seed-1 culled: governor_rollback"]
    slots = {"block2_post": slot("TRAINING", alpha=0.0), "block3_post": slot("NONE", alpha=0.0)}
    lines = epoch_lines(record(events=events, slots=slots, rollback=True), 10, "classification")
    assert lines[1:] == [
        "  governor rollback (loss_spike, loss 1e+03): restored the last healthy epoch",
        "  block2_post  seed-1  TRAINING      alpha 0.00",
        "      seed-1 culled: governor_rollback",
        "  no seed in block3_post",
    ]


def test_empty_slots_to_which_nothing_happened_are_named_together():
    slots = {slot_id: slot("NONE", alpha=0.0) for slot_id in LM_SLOTS}
    slots["layer_2_post_block"] = slot("TRAINING", "seed-3", alpha=0.0)
    events = ["layer_4_post_block: germinated seed-7 (lora): warm-up over", "layer_4_post_block: GERMINATED -> TRAINING"]
    assert epoch_lines(record(events=events, slots=slots), 10, "lm")[1:] == [
        "  layer_2_post_block  seed-3  TRAINING      alpha 0.00",
        "  layer_4_post_block  no seed",
        "      germinated seed-7 (lora): warm-up over; GERMINATED -> TRAINING",
        "  no seed in layer_0_post_block, layer_1_post_block, layer_3_post_block, layer_5_post_block",
    ]


@pytest.mark.parametrize("task_type, label", [
    ("classification", "Shapley value -12.35 +/- 10.25 points"),
    ("lm", "loss Shapley value -0.1235 +/- 0.0521 nats"),
])
@pytest.mark.parametrize("slot_ids", [CIFAR_SLOTS, LM_SLOTS[:5], LM_SLOTS], ids=["2 slots", "5 slots", "6 slots"])
def test_every_line_fits_100_columns_whatever_the_number_of_slots(slot_ids, task_type, label):
    long_gate = ("gate held TRAINING -> BLENDING (global_improvement_insufficient_-0.26%, seed_not_ready, "
                 "isolation_violations_3, gradient_norm_exploding)")
    events = []
    slots = {}
    for i, slot_id in enumerate(slot_ids):
        events += [f"{slot_id}: germinated seed-{i + 11} (conv_light): validation accuracy plateaued",
                   f"{slot_id}: GERMINATED -> TRAINING", f"{slot_id}: {long_gate}",
                   f"{slot_id}: seed-{i + 11} culled: uncertain_shapley (Shapley value +0.42 +/- 1.37 points)"]
        slots[slot_id] = slot("PROBATIONARY", f"seed-{i + 11}", shapley=-12.3456, shapley_error=10.25,
                              loss_shapley=-0.123456, loss_shapley_error=0.0521)
    lines = epoch_lines(record(events=events, slots=slots, epoch=10, epoch_time_s=1234.5), 10, task_type)
    assert max(len(line) for line in lines) <= COLUMNS, "\n".join(lines)
    for slot_id in slot_ids:  # each slot's line says what its numbers are
        line = next(line for line in lines if line.startswith(f"  {slot_id} "))
        assert f"PROBATIONARY  alpha 1.00  {label}" in line
    # No event is lost or repeated: every one is on the lines, once, after its slot's line.
    text = " ".join(line.strip() for line in lines)
    assert text.count("gate held TRAINING -> BLENDING") == len(slot_ids)
    assert text.count("GERMINATED -> TRAINING") == len(slot_ids) and "['" not in text


def test_a_stopped_run_says_where_it_stopped():
    assert where_stopped(3, 0, 8, 50) == "after 3 of 8 epochs"
    assert where_stopped(3, 8, 8, 50) == "after 3 of 8 epochs and 8 of 50 steps of epoch 4"
    assert where_stopped(0, 1, 8, 50) == "after 0 of 8 epochs and 1 of 50 steps of epoch 1"
