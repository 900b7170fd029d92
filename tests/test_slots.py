"""Models with several seed slots: the per-slot API, the configuration tree, the governor and
checkpoints.

The configuration tree walks the host once for many configurations of the slots. On CPU with
scalar alphas every configuration's output must be bit for bit the ordinary forward under the
same forced alphas; each segment must run once per distinct configuration of the slots
above it and each seed once per distinct input; any model it cannot walk exactly must get one
ordinary forward per configuration.
"""

import itertools

import pytest
import torch
import torch.nn as nn

from esper_fast.kasmina import CNNHost, MorphogeneticModel, SeedSlot, SeedStage, TransformerHost
from esper_fast.kasmina.host import forced_alphas, splits_at_slots
from esper_fast.runtime import TaskConfig
from esper_fast.tolaria import TolariaGovernor
from slot_helpers import Counter, grow
from tolerances import assert_close

def cnn_model(n_blocks=3, slots=None, **kwargs):
    host = CNNHost(num_classes=10, n_blocks=n_blocks, base_channels=8)
    slots = list(host.injection_points) if slots is None else slots
    return MorphogeneticModel(host, slots=slots, task_config=TaskConfig.for_cifar10(), **kwargs)


def lm_model(n_layer=4, slots=None, dropout=0.1):
    host = TransformerHost(vocab_size=50, n_embd=16, n_head=2, n_layer=n_layer, block_size=8, dropout=dropout)
    slots = list(host.injection_points) if slots is None else slots
    return MorphogeneticModel(host, slots=slots, task_config=TaskConfig.for_tinystories())


def cnn_images(n=6, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def tokens(n=5, seed=0):
    return torch.randint(0, 50, (n, 8), generator=torch.Generator().manual_seed(seed))


def every_subset(slot_ids):
    """One configuration per subset of ``slot_ids``: the slots outside it off (alpha 0)."""
    return [
        {s: 0.0 for s in slot_ids if s not in subset}
        for size in range(len(slot_ids) + 1)
        for subset in itertools.combinations(slot_ids, size)
    ]


def forced_forward(model, x, configuration):
    with forced_alphas(model.seed_slots, configuration):
        return model(x)


# ---------------------------------------------------------------- the model's slots


def test_a_model_with_several_slots_keeps_the_extra_slots_in_the_host_only():
    single = cnn_model(slots=["block2_post"])
    model = cnn_model(n_blocks=4, slots=["block4_post", "block2_post"])
    assert model.slot_id == "block2_post" and model.seed_slot is model.host.slots["block2_post"]
    assert list(model.seed_slots) == ["block2_post", "block4_post"]  # host order
    assert isinstance(model.host.slots["block4_post"], SeedSlot) and isinstance(model.host.slots["block3_post"], nn.Identity)
    assert model.slot("block4_post") is model.host.slots["block4_post"] and model.slot() is model.seed_slot
    assert {key.split(".")[0] for key in model.state_dict()} == {"host", "seed_slot"}
    assert "host.slots.block4_post._extra_state" in model.state_dict()
    # Without ``slots`` the state dict is the single-slot model's, key for key.
    assert list(MorphogeneticModel(CNNHost(num_classes=10, base_channels=8)).state_dict()) == list(single.state_dict())
    with pytest.raises(TypeError):
        model.seed_slots["block3_post"] = SeedSlot("block3_post", 16)  # a read-only view


def test_slot_choice_and_errors():
    model = cnn_model(n_blocks=4, slots=["block3_post", "block4_post"], slot_id="block4_post")
    assert model.seed_slot.slot_id == "block4_post" and list(model.seed_slots) == ["block3_post", "block4_post"]
    with pytest.raises(ValueError, match="must be one of slots"):
        cnn_model(slots=["block3_post"], slot_id="block2_post")
    with pytest.raises(ValueError, match=r"Slots \['nowhere'\] not found"):
        cnn_model(slots=["block2_post", "nowhere"])
    with pytest.raises(ValueError, match="twice"):
        cnn_model(slots=["block2_post", "block2_post"])
    with pytest.raises(ValueError, match="at least one"):
        cnn_model(slots=[])
    with pytest.raises(ValueError, match="already holds a seed slot"):
        model.add_slot("block3_post")
    with pytest.raises(ValueError, match="not found in host injection points"):
        model.add_slot("block9_post")
    with pytest.raises(ValueError, match="No seed slot at 'block2_post'"):
        model.slot("block2_post")
    added = model.add_slot("block2_post")
    assert model.slot("block2_post") is added and list(model.seed_slots)[0] == "block2_post"
    assert (added.channels, added.task_config, added.fast_mode) == (16, model.task_config, False)


def test_the_single_slot_api_speaks_of_the_main_slot_unless_given_a_slot():
    model = cnn_model()
    model.germinate_seed("norm", "main")
    model.germinate_seed("conv_light", "other", slot="block3_post")
    assert model.seed_state.seed_id == "main" and model.slot("block3_post").state.seed_id == "other"
    assert model.active_seed_params == model.seed_slot.active_seed_params
    main = {id(p) for p in model.get_seed_parameters()}
    other = {id(p) for p in model.get_seed_parameters(slot="block3_post")}
    assert main == {id(p) for p in model.seed_slot.seed.parameters()} and main.isdisjoint(other) and other
    assert not ({id(p) for p in model.get_host_parameters()} & (main | other))
    assert model.live_slots == ("block2_post", "block3_post")
    model.cull_seed(slot="block3_post")
    assert model.slot("block3_post").state is None and model.has_active_seed
    model.cull_seed()
    assert not model.has_active_seed and model.live_slots == ()


def test_live_means_germinated_and_not_fossilized_or_culled():
    model = cnn_model(n_blocks=4)
    grow(model, "block2_post", "norm", SeedStage.GERMINATED, 0.0)
    grow(model, "block3_post", "norm", SeedStage.PROBATIONARY, 1.0)
    grow(model, "block4_post", "norm", SeedStage.FOSSILIZED, 1.0)
    assert model.live_slots == ("block2_post", "block3_post")


def test_moving_the_model_updates_every_slot_device():
    model = cnn_model()
    model.to("meta")
    assert all(slot.device == torch.device("meta") for slot in model.seed_slots.values())
    model.germinate_seed("norm", "s", slot="block3_post")
    assert model.slot("block3_post").seed.scale.device.type == "meta"


# ---------------------------------------------------------------- the configuration tree: exactness

# (blueprint, stage, alpha) per slot: every stage the forward treats differently.
CNN_CASES = {
    "blending+ste": [("conv_light", SeedStage.BLENDING, 0.5), ("conv_light", SeedStage.TRAINING, 0.0)],
    "training_alpha+fossil": [("depthwise", SeedStage.TRAINING, 0.4), ("conv_light", SeedStage.FOSSILIZED, 1.0)],
    "germinated+shadowing": [("norm", SeedStage.GERMINATED, 0.0), ("attention", SeedStage.SHADOWING, 1.0)],
    "4 blocks, 3 blending": [("conv_light", SeedStage.BLENDING, 0.5), ("depthwise", SeedStage.BLENDING, 0.3),
                             ("conv_light", SeedStage.PROBATIONARY, 0.8)],
    "4 blocks, empty+ste+fossil": [(None, None, 0.0), ("conv_light", SeedStage.TRAINING, 0.0),
                                   ("conv_heavy", SeedStage.FOSSILIZED, 1.0)],
}


@pytest.mark.parametrize("case", list(CNN_CASES))
def test_every_subset_on_the_cnn_is_bit_for_bit_the_forced_forward(case):
    torch.manual_seed(0)
    seeds = CNN_CASES[case]
    model = cnn_model(n_blocks=len(seeds) + 1)
    for slot_id, (blueprint, stage, alpha) in zip(model.seed_slots, seeds):
        grow(model, slot_id, blueprint, stage, alpha)
    model.eval()
    assert model._runs_tree(len(seeds))  # the walk, not one forward per configuration
    x = cnn_images(7)
    configurations = every_subset(list(model.seed_slots)) + [{"block2_post": 0.25}, {"block3_post": 1.0, "block2_post": 0.7}]
    with torch.no_grad():
        outputs = model.forward_configurations(x, configurations)
        for configuration, output in zip(configurations, outputs):
            assert torch.equal(output, forced_forward(model, x, configuration)), configuration


LM_CASES = {
    "lora at every layer": [("lora", SeedStage.BLENDING, 0.5), ("lora", SeedStage.TRAINING, 0.0),
                            ("lora", SeedStage.SHADOWING, 1.0), ("lora", SeedStage.TRAINING, 0.4)],
    "mixed blueprints": [("mlp", SeedStage.BLENDING, 0.6), (None, None, 0.0), ("attention", SeedStage.FOSSILIZED, 1.0),
                         ("norm", SeedStage.PROBATIONARY, 0.9)],
}


@pytest.mark.parametrize("case", list(LM_CASES))
def test_every_subset_on_the_transformer_is_bit_for_bit_the_forced_forward(case):
    torch.manual_seed(0)
    model = lm_model(n_layer=4, dropout=0.1)  # dropout is off in eval: the walk must not change that
    for slot_id, (blueprint, stage, alpha) in zip(model.seed_slots, LM_CASES[case]):
        grow(model, slot_id, blueprint, stage, alpha)
        seed = model.slot(slot_id).seed
        if blueprint == "attention":
            nn.init.normal_(seed.proj.weight)
    model.eval()
    assert model._runs_tree(4)
    x = tokens(5)
    configurations = every_subset(list(model.seed_slots))
    with torch.no_grad():
        outputs = model.forward_configurations(x, configurations)
        for configuration, output in zip(configurations, outputs):
            assert torch.equal(output, forced_forward(model, x, configuration)), configuration


def test_per_sample_alphas_match_the_forward_row_by_row():
    torch.manual_seed(0)
    model = cnn_model()
    grow(model, "block2_post", "conv_light", SeedStage.BLENDING, 0.5)
    grow(model, "block3_post", "depthwise", SeedStage.BLENDING, 0.5)
    model.eval()
    x = cnn_images(6)
    ramp = torch.linspace(0, 1, 6)
    configurations = [{"block2_post": ramp}, {"block2_post": ramp, "block3_post": 0.0}, {"block3_post": ramp.flip(0)}]
    with torch.no_grad():
        outputs = model.forward_configurations(x, configurations)
        for configuration, output in zip(configurations, outputs):
            rows = []
            for i in range(6):
                per_row = {s: (float(a[i]) if isinstance(a, torch.Tensor) else a) for s, a in configuration.items()}
                rows.append(forced_forward(model, x, per_row)[i])
            assert_close(output, torch.stack(rows), dtype=torch.float32, what=str(configuration))


def test_per_sample_alphas_without_the_walk_force_the_tensor_into_each_forward():
    torch.manual_seed(0)
    model = cnn_model()
    grow(model, "block2_post", "conv_light", SeedStage.TRAINING, 0.0)  # a tensor alpha blends in TRAINING too
    grow(model, "block3_post", "depthwise", SeedStage.BLENDING, 0.5)
    model.eval()
    x = cnn_images(4)
    ramp = torch.linspace(0, 1, 4)
    configurations = [{"block2_post": ramp}, {"block3_post": ramp, "block2_post": 0.0}]
    with torch.no_grad():
        walked = model.forward_configurations(x, configurations)
        model.slot("block3_post").register_forward_pre_hook(lambda m, args: None)  # no walk now
        forwarded = model.forward_configurations(x, configurations)
    for a, b in zip(walked, forwarded):
        assert_close(a, b, dtype=torch.float32)
    assert model.slot("block2_post").alpha == 0.0 and float(model.slot("block2_post")._alpha_value) == 0.0


def test_stacked_outputs_and_groups():
    torch.manual_seed(0)
    model = cnn_model()
    grow(model, "block2_post", "conv_light", SeedStage.BLENDING, 0.5)
    model.eval()
    x = cnn_images(4)
    with torch.no_grad():
        stacked, groups = model.forward_configurations_stacked(x, [{}, {"block2_post": 0.0}, {"block2_post": 0.5}])
        assert groups == [0, 1, 0] and stacked.shape == (8, 10)
        assert torch.equal(stacked[4:], forced_forward(model, x, {"block2_post": 0.0}))
        as_list = model.forward_configurations(x, [{}, {"block2_post": 0.0}, {"block2_post": 0.5}])
    assert as_list[0] is as_list[2]  # equal configurations share one output


def test_the_one_slot_forward_alpha_configs_is_the_tree_of_the_main_slot():
    torch.manual_seed(0)
    model = cnn_model()
    grow(model, "block2_post", "conv_light", SeedStage.BLENDING, 0.5)
    grow(model, "block3_post", "conv_light", SeedStage.BLENDING, 0.5)
    model.eval()
    x = cnn_images(4)
    with torch.no_grad():
        for got, alpha in zip(model.forward_alpha_configs(x, [0.5, 0.0, 0.9]), [0.5, 0.0, 0.9]):
            with model.seed_slot.force_alpha(alpha):
                assert torch.equal(got, model(x))  # the other slot as it is


# ---------------------------------------------------------------- the configuration tree: cost


def test_each_segment_runs_once_per_distinct_upstream_configuration_and_each_seed_once_per_input():
    torch.manual_seed(0)
    model = cnn_model(n_blocks=4)
    for slot_id in model.seed_slots:
        grow(model, slot_id, "conv_light", SeedStage.BLENDING, 0.5)
    model.eval()
    blocks = [Counter(block) for block in model.host.blocks]
    seeds = [Counter(slot.seed) for slot in model.seed_slots.values()]
    head = Counter(model.host.classifier)
    with torch.no_grad():
        model.forward_configurations(cnn_images(6), every_subset(list(model.seed_slots)))
    assert [(c.calls, c.rows) for c in blocks] == [(1, 6), (1, 6), (1, 12), (1, 24)]
    assert [(c.calls, c.rows) for c in seeds] == [(1, 6), (1, 12), (1, 24)]
    assert (head.calls, head.rows) == (1, 48)


def test_the_newer_esper_lite_twelve_configurations_cost_what_their_eight_distinct_ones_cost():
    torch.manual_seed(0)
    model = cnn_model(n_blocks=4)
    ids = list(model.seed_slots)
    for slot_id in ids:
        grow(model, slot_id, "conv_light", SeedStage.BLENDING, 0.5)
    model.eval()
    off = {s: 0.0 for s in ids}
    twelve = [{}] + [{s: 0.0} for s in ids] + [{t: 0.0 for t in ids if t != s} for s in ids] + [off]
    twelve += [{t: 0.0 for t in ids if t not in pair} for pair in itertools.combinations(ids, 2)] + [off]
    assert len(twelve) == 12
    head = Counter(model.host.classifier)
    x = cnn_images(6)
    with torch.no_grad():
        outputs = model.forward_configurations(x, twelve)
        for configuration, output in zip(twelve, outputs):
            assert torch.equal(output, forced_forward(model, x, configuration))
    assert head.rows == 8 * 6 + 12 * 6  # one walk (8 distinct configurations) + the checks


def test_a_slot_that_cannot_change_the_output_does_not_split_and_its_seed_does_not_run():
    torch.manual_seed(0)
    model = cnn_model(n_blocks=4)
    grow(model, "block2_post", "conv_light", SeedStage.TRAINING, 0.0)  # straight-through
    grow(model, "block3_post", "conv_light", SeedStage.BLENDING, 0.5)
    grow(model, "block4_post", "conv_light", SeedStage.GERMINATED, 0.0)
    model.eval()
    ste, blending = Counter(model.slot("block2_post").seed), Counter(model.slot("block3_post").seed)
    block3, block4 = Counter(model.host.blocks[2]), Counter(model.host.blocks[3])
    with torch.no_grad():
        outputs = model.forward_configurations(cnn_images(5), every_subset(list(model.seed_slots)))
    assert ste.calls == 0 and (blending.calls, blending.rows) == (1, 5)
    assert (block3.calls, block3.rows) == (1, 5) and (block4.calls, block4.rows) == (1, 10)
    assert len({id(o) for o in outputs}) == 2  # only the blending seed makes a difference


def test_a_model_without_live_seeds_runs_one_forward():
    model = cnn_model().eval()
    head = Counter(model.host.classifier)
    with torch.no_grad():
        outputs = model.forward_configurations(cnn_images(3), every_subset(list(model.seed_slots)))
    assert (head.calls, head.rows) == (1, 3) and all(o is outputs[0] for o in outputs)


# ---------------------------------------------------------------- the configuration tree: one forward each


class PlusOneHost(CNNHost):
    """A subclass whose forward differs from the segments it inherits."""

    def forward(self, x):
        return super().forward(x) + 1.0


class HalvesOnlyHost(CNNHost):
    """A host that defines only the two halves beside its forward (no forward_between)."""

    def forward(self, x):
        return super().forward(x)

    def forward_to_slot(self, x, slot_id):
        return super().forward_to_slot(x, slot_id)

    def forward_from_slot(self, features, slot_id):
        return super().forward_from_slot(features, slot_id)


def _two_blending(model):
    torch.manual_seed(0)
    grow(model, "block2_post", "conv_light", SeedStage.BLENDING, 0.5)
    grow(model, "block3_post", "conv_light", SeedStage.BLENDING, 0.5)
    return model


def _calls_of_the_first_block(model, configurations, x):
    first = Counter(model.host.blocks[0])
    with torch.no_grad():
        outputs = model.forward_configurations(x, configurations)
        for configuration, output in zip(configurations, outputs):
            assert torch.equal(output, forced_forward(model, x, configuration)), configuration
    return first.calls - len(configurations)  # the forced forwards above call it once each


def test_models_that_cannot_be_walked_exactly_get_one_forward_per_configuration():
    configurations = every_subset(["block2_post", "block3_post"])
    x = cnn_images(4)

    plus_one = MorphogeneticModel(PlusOneHost(num_classes=10, base_channels=8), slots=["block2_post", "block3_post"])
    assert _calls_of_the_first_block(_two_blending(plus_one).eval(), configurations, x) == 4

    hooked = _two_blending(cnn_model()).eval()
    handle = hooked.slot("block3_post").register_forward_hook(lambda m, i, o: o * 2)
    assert _calls_of_the_first_block(hooked, configurations, x) == 4
    handle.remove()
    assert _calls_of_the_first_block(hooked, configurations, x) == 1

    training = _two_blending(cnn_model())  # train mode: BatchNorm mixes the rows
    first = Counter(training.host.blocks[0])
    with torch.no_grad():
        training.forward_configurations(x, configurations)
    assert first.calls == 4

    no_stats = _two_blending(cnn_model()).eval()
    no_stats.host.blocks[0].bn = nn.BatchNorm2d(8, track_running_stats=False).eval()  # batch statistics in eval
    assert _calls_of_the_first_block(no_stats, configurations, x) == 4


def test_a_host_with_only_the_halves_is_walked_at_one_slot_and_forwarded_per_configuration_at_two():
    host = HalvesOnlyHost(num_classes=10, base_channels=8)
    assert splits_at_slots(host) and not splits_at_slots(host, between=True)
    assert splits_at_slots(CNNHost(), between=True) and splits_at_slots(TransformerHost(vocab_size=8, n_embd=8, n_head=2), between=True)
    model = _two_blending(MorphogeneticModel(host, slots=["block2_post", "block3_post"])).eval()
    x = cnn_images(4)
    assert _calls_of_the_first_block(model, every_subset(["block2_post"]), x) == 1
    assert _calls_of_the_first_block(model, every_subset(["block2_post", "block3_post"]), x) == 4


def test_bad_configurations_are_rejected():
    model = cnn_model(slots=["block2_post"]).eval()
    with pytest.raises(ValueError, match=r"no seed slot at \['block3_post'\]"):
        model.forward_configurations(cnn_images(2), [{"block3_post": 0.0}])
    with pytest.raises(ValueError, match="at least one configuration"):
        model.forward_configurations(cnn_images(2), [])


def test_forward_between_checks_its_segment():
    host = CNNHost(n_blocks=4, base_channels=8)
    x = cnn_images(2)
    features = host.forward_to_slot(x, "block3_post")
    assert torch.equal(host.forward_between(host.forward_between(x, None, "block2_post"), "block2_post", "block3_post"), features)
    with pytest.raises(ValueError, match="does not come after"):
        host.forward_between(features, "block3_post", "block2_post")
    with pytest.raises(ValueError, match="does not come after"):
        host.forward_between(features, "block3_post", "block3_post")
    with pytest.raises(ValueError, match="Unknown injection point"):
        host.forward_between(x, None, "nowhere")


# ---------------------------------------------------------------- governor


def _governed_model():
    torch.manual_seed(0)
    model = cnn_model(n_blocks=4)
    grow(model, "block2_post", "conv_light", SeedStage.BLENDING, 0.5)
    grow(model, "block3_post", "norm", SeedStage.TRAINING, 0.0)
    grow(model, "block4_post", "depthwise", SeedStage.FOSSILIZED, 1.0)
    return model


def test_the_snapshot_covers_every_slot_and_leaves_out_every_live_seed():
    model = _governed_model()
    state = TolariaGovernor(model).last_good_state
    assert not any(key.startswith(("host.slots.block2_post.seed.", "host.slots.block3_post.seed.", "seed_slot.seed."))
                   for key in state)
    assert any(key.startswith("host.slots.block4_post.seed.") for key in state)  # a fossil is part of the model
    for slot_id in model.seed_slots:
        assert state[f"host.slots.{slot_id}._extra_state"]["seed_state"].seed_id == f"seed-{slot_id}"


@pytest.mark.parametrize("clear", [False, True])
def test_a_rollback_culls_every_live_seed_and_restores_the_host(clear):
    model = _governed_model()
    governor = TolariaGovernor(model, clear_live_seed_state=clear)
    host_before = [p.detach().clone() for p in model.get_host_parameters()]
    fossil_before = [p.detach().clone() for p in model.get_seed_parameters(slot="block4_post")]
    with torch.no_grad():
        for p in list(model.get_host_parameters()) + list(model.get_seed_parameters(slot="block4_post")):
            p.add_(1.0)
    events = []
    for slot in model.seed_slots.values():
        slot.on_telemetry = events.append
    report = governor.execute_rollback()
    assert report.rollback_occurred
    assert model.slot("block2_post").seed is None and model.slot("block3_post").seed is None
    assert model.slot("block4_post").state.stage == SeedStage.FOSSILIZED
    culled = [e.slot_id for e in events if e.event_type.name == "SEED_CULLED"]
    assert culled == ["block2_post", "block3_post"]
    assert all(torch.equal(a, b) for a, b in zip(model.get_host_parameters(), host_before))
    assert all(torch.equal(a, b) for a, b in zip(model.get_seed_parameters(slot="block4_post"), fossil_before))
    states = [model.slot(s).state for s in ("block2_post", "block3_post")]
    # The original's quirk by default: the snapshot's lifecycle state comes back without its seed.
    assert all(state is None for state in states) if clear else all(state is not None for state in states)
    assert model.live_slots == ()


# ---------------------------------------------------------------- checkpoints


def test_a_model_with_several_slots_round_trips_through_its_state_dict():
    model = _governed_model()
    model.slot("block2_post").set_alpha(0.3)
    saved = model.state_dict()
    torch.manual_seed(1)
    restored = cnn_model(n_blocks=4)
    for slot_id, blueprint in zip(restored.seed_slots, ("conv_light", "norm", "depthwise")):
        restored.germinate_seed(blueprint, "fresh", slot=slot_id)
    restored.load_state_dict(saved)
    for key, value in restored.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, saved[key]), key
    for slot_id, slot in restored.seed_slots.items():
        original = model.slot(slot_id)
        assert (slot.state.seed_id, slot.state.stage, slot.alpha) == (original.state.seed_id, original.state.stage, original.alpha)
    x = cnn_images(3)
    model.eval()
    restored.eval()
    assert torch.equal(model(x), restored(x))


def test_an_old_single_slot_state_dict_loads_into_a_model_with_more_slots():
    torch.manual_seed(0)
    old = MorphogeneticModel(CNNHost(num_classes=10, base_channels=8), task_config=TaskConfig.for_cifar10())
    old.germinate_seed("conv_light", "old")
    saved = old.state_dict()
    same = MorphogeneticModel(CNNHost(num_classes=10, base_channels=8), task_config=TaskConfig.for_cifar10())
    same.germinate_seed("conv_light", "new")
    same.load_state_dict(saved)  # the model built as before
    assert same.seed_state.seed_id == "old"
    wider = cnn_model()
    wider.germinate_seed("conv_light", "new")
    wider.load_state_dict(saved)  # strict: the extra slot keeps its (empty) state
    assert wider.seed_state.seed_id == "old" and wider.slot("block3_post").state is None
    wider.germinate_seed("norm", "extra", slot="block3_post")
    with pytest.raises(RuntimeError, match="block3_post.seed"):
        wider.load_state_dict(saved)  # the extra slot's seed weights are not in the old checkpoint
    del saved["seed_slot._extra_state"], saved["host.slots.block2_post._extra_state"]
    with pytest.raises(RuntimeError, match="_extra_state"):
        same.load_state_dict(saved)  # the main slot's state is still required
