"""The host contract (kasmina.protocol, kasmina.segments), the topology entries
(kasmina.topologies) and the configuration keys (kasmina.configurations): what a new host
type or topology relies on."""

import itertools

import pytest
import torch
import torch.nn as nn

from esper_fast.kasmina import BlueprintRegistry, CNNHost, MorphogeneticModel, SeedStage, TransformerHost
from esper_fast.kasmina.configurations import (
    HOST,
    changes_output,
    configuration_key,
    forced_alphas,
    slot_key,
    straight_through,
)
from esper_fast.kasmina.protocol import HostProtocol, SegmentedHost, SplitHost
from esper_fast.kasmina.segments import SlotSegments, splits_at_slots
from esper_fast.kasmina.topologies import TOPOLOGIES, slots_in_host_order, topology
from esper_fast.runtime import TaskConfig
from slot_helpers import Counter, grow


class TinyHost(SlotSegments, nn.Module):
    """A new host type: three linear layers on ``[B, T, 8]`` with a slot after the first two.
    It defines its injection points and the one segment its forward is made of."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.slots = nn.ModuleDict({"a": nn.Identity(), "b": nn.Identity()})

    @property
    def injection_points(self):
        return {"a": 8, "b": 8}

    def forward_between(self, features, from_slot, to_slot):
        self._check_segment(from_slot, to_slot)
        keys = list(self.slots)
        first = 0 if from_slot is None else keys.index(from_slot) + 1
        for i in range(first, len(self.layers)):
            features = self.layers[i](features)
            if i < len(keys):
                if keys[i] == to_slot:
                    return features
                features = self.slots[keys[i]](features)
        return features


def test_both_hosts_keep_the_declared_segment_contract():
    for host in (CNNHost(), TransformerHost(vocab_size=10, n_embd=8, n_head=2, n_layer=2), TinyHost()):
        assert isinstance(host, HostProtocol) and isinstance(host, SplitHost) and isinstance(host, SegmentedHost)
        assert splits_at_slots(host) and splits_at_slots(host, between=True)


def test_a_new_host_type_on_slot_segments_is_walked_exactly():
    torch.manual_seed(0)
    model = MorphogeneticModel(TinyHost(), slots=["a", "b"], task_config=TaskConfig.for_tinystories())
    grow(model, "a", "lora", SeedStage.BLENDING, 0.4)
    grow(model, "b", "lora", SeedStage.BLENDING, 0.7)
    model.eval()
    x = torch.randn(3, 5, 8)
    configurations = [{s: 0.0 for s in off} for k in range(3) for off in itertools.combinations("ab", k)]
    assert model._runs_tree(2)
    first = Counter(model.host.layers[0])
    with torch.no_grad():
        outputs = model.forward_configurations(x, configurations)
        assert first.calls == 1  # the stem runs once for every configuration
        for configuration, output in zip(configurations, outputs):
            with forced_alphas(model.seed_slots, configuration):
                assert torch.equal(output, model(x)), configuration
    with pytest.raises(ValueError, match="does not come after"):
        model.host.forward_between(x, "b", "a")


def test_the_topology_entries_are_what_the_hosts_and_the_registry_use():
    assert tuple(CNNHost(n_blocks=4).injection_points) == topology("cnn").slot_ids(4)
    host = TransformerHost(vocab_size=10, n_embd=8, n_head=2, n_layer=3)
    assert tuple(host.injection_points) == topology("transformer").slot_ids(3)
    for name, entry in TOPOLOGIES.items():
        assert entry.blueprints() == BlueprintRegistry.names(name)
        assert entry.default_blueprint in entry.blueprints()
    from esper_fast.kasmina.blueprints import TOPOLOGIES as registry_topologies

    assert registry_topologies == tuple(TOPOLOGIES)
    with pytest.raises(ValueError, match="Unknown topology"):
        topology("mlp")
    assert slots_in_host_order(["block3_post", "block2_post"], CNNHost().injection_points) == ["block2_post", "block3_post"]


def test_the_straight_through_rule_and_the_configuration_keys():
    assert straight_through(SeedStage.TRAINING, 0.0)
    assert not straight_through(SeedStage.TRAINING, 0.1) and not straight_through(SeedStage.BLENDING, 0.0)
    assert not straight_through(SeedStage.TRAINING, torch.zeros(4))  # a per-sample alpha blends
    torch.manual_seed(0)
    model = MorphogeneticModel(CNNHost(base_channels=8), slots=["block2_post", "block3_post"])
    grow(model, "block2_post", "conv_light", SeedStage.TRAINING, 0.0)
    grow(model, "block3_post", "conv_light", SeedStage.BLENDING, 0.5)
    training, blending = model.slot("block2_post"), model.slot("block3_post")
    assert slot_key(training) == HOST == training.configuration_key(None)
    assert slot_key(blending) == ("float", 0.5) and slot_key(blending, 2.0) == ("float", 1.0)
    assert not changes_output(training, 0.0) and changes_output(blending, 0.0)
    assert configuration_key(model.seed_slots, {"block3_post": 0.0}) == (HOST, ("float", 0.0))


# ---------------------------------------------------------------- a new attribution method is one file


def leave_one_out(model, testloader, criterion, device, task_type="classification"):
    """A minimal attribution method on the validation engine: per live slot, the accuracy
    of the model as is minus the accuracy with that seed off, all measured in one pass."""
    from esper_fast.tolaria.passes import ValidationSpec, evaluating
    from esper_fast.tolaria.validation import measure

    live = list(model.live_slots)
    configurations = [{}] + [{slot_id: 0.0} for slot_id in live]
    spec = ValidationSpec(criterion, device, task_type, per_class=False, num_classes=None)
    with evaluating(model):
        results, _ = measure(model, testloader, spec, configurations=configurations, original_passes=False)
    return {slot_id: results[0].accuracy - results[k + 1].accuracy for k, slot_id in enumerate(live)}


def test_a_new_attribution_method_on_the_engine_agrees_with_slot_attribution():
    from esper_fast.tolaria import slot_attribution

    torch.manual_seed(0)
    model = MorphogeneticModel(CNNHost(base_channels=8, n_blocks=4), slots=["block2_post", "block3_post", "block4_post"],
                               task_config=TaskConfig.for_cifar10())
    grow(model, "block2_post", "conv_light", SeedStage.BLENDING, 0.5)
    grow(model, "block3_post", "conv_light", SeedStage.TRAINING, 0.0)  # cannot change the output
    grow(model, "block4_post", "conv_light", SeedStage.SHADOWING, 1.0)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(3)]
    ours = leave_one_out(model, data, nn.CrossEntropyLoss(), "cpu")
    theirs = slot_attribution(model, data, nn.CrossEntropyLoss(), "cpu").accuracy.leave_one_out
    assert ours == theirs and ours["block3_post"] == 0.0
