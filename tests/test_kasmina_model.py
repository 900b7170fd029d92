"""Blueprints, the alpha ramp, the join operators, the hosts and MorphogeneticModel."""

import math

import pytest
import torch

import esper_fast.kasmina as kasmina
from esper_fast import ops
from esper_fast.kasmina import (
    AlphaSchedule,
    BlueprintRegistry,
    CNNHost,
    MorphogeneticModel,
    SeedSlot,
    SeedStage,
    TransformerHost,
    blend_with_isolation,
    ste_forward,
)
from esper_fast.kasmina import isolation
from esper_fast.runtime import TaskConfig

CNN_BLUEPRINTS = ["norm", "attention", "depthwise", "conv_light", "conv_heavy"]
TRANSFORMER_BLUEPRINTS = ["norm", "lora", "attention", "mlp"]


def small_transformer(**kwargs):
    config = dict(vocab_size=64, n_embd=32, n_head=2, n_layer=2, block_size=16, dropout=0.0)
    config.update(kwargs)
    return TransformerHost(**config)


def test_public_names():
    expected = {
        "MorphogeneticModel", "CNNHost", "TransformerHost", "SeedSlot", "SeedState", "SeedMetrics", "SeedStage",
        "QualityGates", "BlueprintRegistry", "AlphaSchedule", "blend_with_isolation", "ste_forward",
    }
    assert expected <= set(kasmina.__all__)
    from esper_fast.kasmina.slot import QualityGates, SeedMetrics, SeedSlot, SeedStage, SeedState  # noqa: F401


# ---------------------------------------------------------------- blueprints


def test_registry_lists_the_blueprints():
    assert set(BlueprintRegistry.names("cnn")) == set(CNN_BLUEPRINTS)
    assert set(BlueprintRegistry.names("transformer")) == set(TRANSFORMER_BLUEPRINTS)


@pytest.mark.parametrize("name", CNN_BLUEPRINTS)
@pytest.mark.parametrize("channels", [1, 3, 16, 48])
def test_cnn_blueprints_preserve_shape(name, channels):
    seed = BlueprintRegistry.create("cnn", name, channels)
    for x in (torch.randn(2, channels, 7, 5), torch.randn(3, channels, 4, 4).to(memory_format=torch.channels_last)):
        y = seed(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
    y.sum().backward()
    assert any(p.grad is not None for p in seed.parameters())


@pytest.mark.parametrize("name", TRANSFORMER_BLUEPRINTS)
@pytest.mark.parametrize("dim", [8, 32, 36])
def test_transformer_blueprints_preserve_shape(name, dim):
    seed = BlueprintRegistry.create("transformer", name, dim)
    for t in (1, 5):
        x = torch.randn(2, t, dim)
        y = seed(x)
        assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("topology,names", [("cnn", ["norm", "attention"]), ("transformer", TRANSFORMER_BLUEPRINTS)])
def test_seeds_start_at_or_near_the_identity(topology, names):
    for name in names:
        seed = BlueprintRegistry.create(topology, name, 16)
        x = torch.randn(2, 16, 4, 4) if topology == "cnn" else torch.randn(2, 3, 16)
        expected = 0.9526 * x if (topology, name) == ("cnn", "attention") else x  # SE gate sigmoid(3)
        torch.testing.assert_close(seed(x), expected, rtol=1e-4, atol=1e-4)


def test_transformer_attention_seed_is_causal():
    seed = BlueprintRegistry.create("transformer", "attention", 16)
    torch.nn.init.normal_(seed.proj.weight)
    x = torch.randn(1, 6, 16)
    y = seed(x)
    x2 = x.clone()
    x2[:, 4:] += 1.0
    torch.testing.assert_close(seed(x2)[:, :4], y[:, :4])


def test_unknown_blueprint_and_topology_errors_list_choices():
    with pytest.raises(ValueError, match=r"unknown blueprint 'mlp' for topology 'cnn'.*conv_heavy"):
        BlueprintRegistry.create("cnn", "mlp", 8)
    with pytest.raises(ValueError, match=r"unknown topology 'rnn'.*transformer"):
        BlueprintRegistry.create("rnn", "norm", 8)


def test_param_estimates_order_and_actual_counts():
    specs = BlueprintRegistry.list_for_topology("transformer")
    assert [s.param_estimate for s in specs] == sorted(s.param_estimate for s in specs)
    assert BlueprintRegistry.get("transformer", "lora").actual_param_count(384) == 2 * 384 * 8


# ---------------------------------------------------------------- alpha schedule


def test_alpha_schedule_endpoints_and_midpoint():
    schedule = AlphaSchedule(10)
    assert schedule(-3) == schedule(0) == 0.0
    assert schedule(10) == schedule(50) == 1.0
    assert schedule(5) == pytest.approx(0.5)
    assert schedule(3) == pytest.approx(1 / (1 + math.exp(2.0)))
    custom = AlphaSchedule(4, start=0.2, end=0.6, temperature=0.5)
    assert custom(0) == 0.2 and custom(4) == 0.6 and custom(2) == pytest.approx(0.4)


@pytest.mark.parametrize("total_steps,temperature", [(1, 1.0), (5, 1.0), (20, 3.0), (7, 0.0)])
def test_alpha_schedule_is_monotonic_within_bounds(total_steps, temperature):
    schedule = AlphaSchedule(total_steps, temperature=temperature)
    values = [schedule(step) for step in range(-1, total_steps + 2)]
    assert values == sorted(values)
    assert all(0.0 <= v <= 1.0 for v in values)


def test_alpha_schedule_guards_degenerate_arguments():
    schedule = AlphaSchedule(0, temperature=-1.0)
    assert schedule.total_steps == 1 and schedule.temperature > 0
    assert schedule(1) == 1.0


# ---------------------------------------------------------------- join operators


def test_blend_with_isolation_and_ste_forward_call_the_fused_ops(monkeypatch):
    calls = []
    monkeypatch.setattr(ops, "blend", lambda *args: calls.append(("blend", args)) or "blended")
    monkeypatch.setattr(ops, "ste", lambda *args: calls.append(("ste", args)) or "ste")
    host, seed = torch.randn(2, 3), torch.randn(2, 3)
    assert blend_with_isolation(host, seed, 0.4) == "blended"
    assert blend_with_isolation(host, seed, 0.6, detach_host=False) == "blended"
    assert ste_forward(host, seed) == "ste"
    assert [c[0] for c in calls] == ["blend", "blend", "ste"]
    assert calls[0][1][2:] == (0.4, True) and calls[1][1][2:] == (0.6, False)
    assert isolation.ops is ops


def test_blend_with_isolation_values_and_gradients():
    host = torch.randn(4, 5, requires_grad=True)
    seed = torch.randn(4, 5, requires_grad=True)
    y = blend_with_isolation(host, seed, 0.3, detach_host=False)
    torch.testing.assert_close(y, host + 0.3 * (seed - host))
    y.sum().backward()
    torch.testing.assert_close(host.grad, torch.full_like(host, 0.7))
    torch.testing.assert_close(seed.grad, torch.full_like(seed, 0.3))
    host.grad = seed.grad = None
    blend_with_isolation(host, seed, 1.7).sum().backward()  # alpha clamps to 1, host detached
    assert host.grad is None
    torch.testing.assert_close(seed.grad, torch.ones_like(seed))


def test_ste_forward_values_and_gradients():
    host = torch.randn(3, 4, requires_grad=True)
    seed = torch.randn(3, 4, requires_grad=True)
    y = ste_forward(host, seed)
    assert torch.equal(y, host)
    g = torch.randn(3, 4)
    y.backward(g)
    assert torch.equal(host.grad, g) and torch.equal(seed.grad, g)


# ---------------------------------------------------------------- hosts


def test_cnn_host_structure_and_forward():
    host = CNNHost(num_classes=7, n_blocks=3, base_channels=4)
    assert host.injection_points == {"block2_post": 8, "block3_post": 16}
    assert [b.conv.out_channels for b in host.blocks] == [4, 8, 16]
    assert host.blocks[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    out = host(x)
    assert out.shape == (2, 7)
    plain = CNNHost(num_classes=7, n_blocks=3, base_channels=4, memory_format=None)
    plain.load_state_dict(host.state_dict())
    torch.testing.assert_close(plain(x), out, rtol=1e-5, atol=1e-5)
    assert CNNHost(n_blocks=4, base_channels=2).injection_points == {"block2_post": 4, "block3_post": 8, "block4_post": 16}


def test_cnn_host_accepts_channels_last_input_and_slots_see_it():
    host = CNNHost(base_channels=4)
    seen = []
    host.register_slot("block2_post", _Recorder(seen))
    out = host(torch.randn(2, 3, 16, 16).to(memory_format=torch.channels_last))
    assert out.shape == (2, 10)
    assert seen[0].shape == (2, 8, 4, 4) and seen[0].is_contiguous(memory_format=torch.channels_last)


class _Recorder(torch.nn.Module):
    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def forward(self, x):
        self.seen.append(x)
        return x


def test_cnn_host_rejects_too_few_blocks_and_unknown_slots():
    with pytest.raises(ValueError, match="n_blocks >= 2"):
        CNNHost(n_blocks=1)
    host = CNNHost(base_channels=4)
    with pytest.raises(ValueError, match=r"unknown injection point 'block1_post'.*block2_post"):
        host.register_slot("block1_post", torch.nn.Identity())
    host.register_slot("block2_post", _Recorder([]))
    host.unregister_slot("block2_post")
    assert isinstance(host.slots["block2_post"], torch.nn.Identity)


def test_transformer_host_forward_and_tied_weights():
    host = small_transformer()
    assert host.injection_points == {"layer_0_post_block": 32, "layer_1_post_block": 32}
    assert host.head.weight is host.tok_emb.weight
    tokens = torch.randint(0, 64, (3, 16))
    logits = host(tokens)
    assert logits.shape == (3, 16, 64)
    with pytest.raises(ValueError, match="exceeds block_size"):
        host(torch.randint(0, 64, (1, 17)))


def test_transformer_host_is_causal():
    host = small_transformer().eval()
    tokens = torch.randint(0, 64, (1, 10))
    changed = tokens.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % 64
    torch.testing.assert_close(host(changed)[:, :7], host(tokens)[:, :7])


def test_transformer_host_default_size():
    host = TransformerHost()
    n_params = sum(p.numel() for p in host.parameters())
    # tied head: embeddings + 6 blocks of 12 d^2 + 13 d + final norm
    d = 384
    expected = 50257 * d + 256 * d + 6 * (12 * d * d + 13 * d) + 2 * d
    assert n_params == expected
    assert len(host.injection_points) == 6


# ---------------------------------------------------------------- MorphogeneticModel


def test_model_wires_one_slot_at_the_first_injection_point():
    model = MorphogeneticModel(CNNHost(base_channels=4))
    assert model.slot_id == "block2_post"
    assert model.host.slots["block2_post"] is model.seed_slot
    assert isinstance(model.host.slots["block3_post"], torch.nn.Identity)
    assert model.seed_slot.channels == 8 and model.seed_slot.topology == "cnn"
    assert not model.has_active_seed and model.seed_state is None and model.active_seed_params == 0


def test_model_slot_choice_and_errors():
    model = MorphogeneticModel(CNNHost(base_channels=4), slot_id="block3_post")
    assert model.host.slots["block3_post"] is model.seed_slot and model.seed_slot.channels == 16
    with pytest.raises(ValueError, match=r"unknown injection point 'nowhere'.*block3_post"):
        MorphogeneticModel(CNNHost(base_channels=4), slot_id="nowhere")
    with pytest.raises(ValueError, match="injection_points"):
        MorphogeneticModel(torch.nn.Linear(2, 2))


def test_model_seed_helpers_and_parameter_split():
    model = MorphogeneticModel(CNNHost(base_channels=4))
    host_params = list(model.get_host_parameters())
    assert list(model.get_seed_parameters()) == []
    model.germinate_seed("conv_light", "seed-1")
    assert model.has_active_seed and model.seed_state.seed_id == "seed-1"
    assert model.seed_state.stage == SeedStage.GERMINATED
    seed_params = list(model.get_seed_parameters())
    assert model.active_seed_params == sum(p.numel() for p in seed_params) > 0
    assert model.seed_state.metrics.host_param_count == sum(p.numel() for p in host_params)
    host_after = list(model.get_host_parameters())
    assert [id(p) for p in host_after] == [id(p) for p in host_params]
    assert {id(p) for p in model.parameters()} == {id(p) for p in host_params + seed_params}
    model.cull_seed()
    assert not model.has_active_seed and list(model.get_seed_parameters()) == []


def test_model_forward_with_seed_through_the_lifecycle():
    model = MorphogeneticModel(CNNHost(base_channels=4))
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    baseline = model(x)
    model.germinate_seed("conv_light", "s")
    model.seed_slot.advance_stage(SeedStage.TRAINING)
    torch.testing.assert_close(model(x), baseline, rtol=0, atol=0)  # STE: value unchanged
    model.seed_slot.state.transition(SeedStage.BLENDING)
    model.seed_slot.set_alpha(1.0)
    assert not torch.allclose(model(x), baseline)
    with model.seed_slot.force_alpha(0.0):
        torch.testing.assert_close(model(x), baseline, rtol=1e-6, atol=1e-6)


def test_model_training_step_reaches_host_and_seed():
    model = MorphogeneticModel(CNNHost(base_channels=4))
    model.germinate_seed("norm", "s")
    model.seed_slot.advance_stage(SeedStage.TRAINING)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None for p in model.get_host_parameters())
    assert all(p.grad is not None for p in model.get_seed_parameters())


def test_transformer_model_uses_transformer_blueprints():
    model = MorphogeneticModel(small_transformer(), slot_id="layer_1_post_block")
    assert model.seed_slot.topology == "transformer"
    model.germinate_seed("lora", "s")
    model.seed_slot.advance_stage(SeedStage.TRAINING)
    assert model(torch.randint(0, 64, (2, 8))).shape == (2, 8, 64)
    configured = MorphogeneticModel(small_transformer(), task_config=TaskConfig.for_tinystories())
    assert configured.seed_slot.topology == "transformer"
    with pytest.raises(ValueError, match="unknown blueprint 'conv_light' for topology 'transformer'"):
        configured.germinate_seed("conv_light", "x")


def test_model_state_dict_round_trip_with_seed():
    model = MorphogeneticModel(CNNHost(base_channels=4))
    model.germinate_seed("depthwise", "s")
    keys = set(model.state_dict())
    assert any(k.startswith("seed_slot.seed.") for k in keys)
    assert any(k.startswith("host.slots.block2_post.seed.") for k in keys)
    clone = MorphogeneticModel(CNNHost(base_channels=4))
    clone.germinate_seed("depthwise", "s")
    clone.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    model.eval(), clone.eval()
    clone.seed_slot.state.transition(SeedStage.TRAINING)
    model.seed_slot.state.transition(SeedStage.TRAINING)
    torch.testing.assert_close(clone(x), model(x))


def test_model_to_updates_where_new_seeds_go():
    model = MorphogeneticModel(CNNHost(base_channels=4))
    model.to(torch.float64)
    assert model.seed_slot.device == torch.device("cpu")
    model.seed_slot.device = torch.device("meta")
    model.to("cpu")
    assert model.seed_slot.device == torch.device("cpu")


def test_slot_registers_its_seed_as_a_submodule():
    slot = SeedSlot("s", 4)
    assert list(slot.parameters()) == []
    slot.germinate("norm")
    assert {n for n, _ in slot.named_parameters()} == {"seed.norm.weight", "seed.norm.bias", "seed.scale"}
    slot.cull()
    assert list(slot.parameters()) == []


def test_transformer_host_starts_near_uniform_loss():

    torch.manual_seed(0)
    host = TransformerHost(vocab_size=512, n_embd=32, n_head=2, n_layer=2, block_size=16, dropout=0.0)
    tokens = torch.randint(0, 512, (4, 16))
    logits = host(tokens)
    loss = torch.nn.functional.cross_entropy(logits.view(-1, 512), tokens.view(-1))
    assert abs(loss.item() - math.log(512)) < 0.5
