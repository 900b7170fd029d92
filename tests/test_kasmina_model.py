"""Blueprints and their registry, the seeds' parameters and initialisation, the alpha ramp,
the join operators, the hosts and MorphogeneticModel.

Initialisation is stated as a construction order: under the same torch seed each module
holds exactly the weights of the plain PyTorch layers built here in that order."""

import dataclasses
import inspect
import math
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import esper_fast.kasmina as kasmina
from esper_fast import ops
from esper_fast.kasmina import (
    AlphaSchedule,
    BlueprintRegistry,
    CNNHost,
    ConvBlock,
    GradientIsolationMonitor,
    HostProtocol,
    MorphogeneticModel,
    SeedSlot,
    SeedStage,
    TransformerHost,
    blend_with_isolation,
    isolation,
    ste_forward,
)
from esper_fast.kasmina.blueprints import get_num_groups
from esper_fast.kasmina.blueprints import transformer as transformer_blueprints
from esper_fast.leyline import actions as leyline_actions
from esper_fast.runtime import TaskConfig
from tolerances import assert_close

HAS_FLEX = transformer_blueprints._HAS_FLEX_ATTENTION
needs_flex = pytest.mark.skipif(not HAS_FLEX, reason="torch without FlexAttention")
CNN_NAMES = ["norm", "attention", "depthwise", "conv_light", "conv_heavy"]
TRANSFORMER_NAMES = ["norm", "lora", "attention"] + (["flex_attention"] if HAS_FLEX else []) + ["mlp"]
TRANSFORMER_PLAIN = ["norm", "lora", "attention", "mlp"]  # forward and backward on every device


def small_transformer(**kwargs):
    config = dict(vocab_size=64, n_embd=32, n_head=2, n_layer=2, block_size=16, dropout=0.0)
    config.update(kwargs)
    return TransformerHost(**config)


def test_public_names_include_the_originals():
    original = {
        "SeedStage", "VALID_TRANSITIONS", "is_valid_transition", "is_terminal_stage", "is_active_stage",
        "is_failure_stage", "GateLevel", "GateResult", "SeedMetrics", "SeedState", "QualityGates", "SeedSlot",
        "BlueprintRegistry", "BlueprintSpec", "ConvBlock", "AlphaSchedule", "blend_with_isolation",
        "GradientIsolationMonitor", "HostProtocol", "CNNHost", "TransformerHost", "TransformerBlock",
        "MorphogeneticModel",
    }
    assert original <= set(kasmina.__all__)
    assert all(hasattr(kasmina, name) for name in original)


# ============================================================================ registry


REGISTRY = {
    "cnn": [
        ("norm", 100, "GroupNorm enhancement"),
        ("attention", 2000, "SE-style channel attention"),
        ("depthwise", 4800, "Depthwise-separable conv"),
        ("conv_light", 37000, "Light conv block"),
        ("conv_heavy", 74000, "Heavy conv block"),
    ],
    "transformer": [
        ("norm", 800, "LayerNorm only"),
        ("lora", 6000, "Low-rank adapter (rank=8)"),
        ("attention", 50000, "Additional self-attention head"),
        *([("flex_attention", 55000, "FlexAttention with causal mask (PyTorch 2.5+)")] if HAS_FLEX else []),
        ("mlp", 1200000, "Additional MLP (4x expansion)"),
    ],
}


@pytest.mark.parametrize("topology", ["cnn", "transformer"])
def test_list_for_topology_is_sorted_by_param_estimate(topology):
    specs = BlueprintRegistry.list_for_topology(topology)
    assert [(s.name, s.param_estimate, s.description) for s in specs] == REGISTRY[topology]
    assert all(s.topology == topology for s in specs)


def test_registry_keys_are_topology_colon_name():
    expected = {f"{t}:{name}" for t, rows in REGISTRY.items() for name, _, _ in rows}
    assert set(BlueprintRegistry._blueprints) == expected
    assert BlueprintRegistry.get("cnn", "norm") is BlueprintRegistry._blueprints["cnn:norm"]


@pytest.mark.parametrize(
    "topology,name,available",
    [("cnn", "mlp", CNN_NAMES), ("transformer", "conv_heavy", TRANSFORMER_NAMES), ("rnn", "norm", [])],
)
def test_get_unknown_blueprint_lists_the_names(topology, name, available):
    with pytest.raises(ValueError) as info:
        BlueprintRegistry.get(topology, name)
    assert str(info.value) == f"Unknown blueprint {name!r} for {topology}. Available: {available}"
    with pytest.raises(ValueError, match="Unknown blueprint"):
        BlueprintRegistry.create(topology, name, 8)


def test_create_passes_kwargs_to_the_factory():
    assert BlueprintRegistry.create("cnn", "attention", 16, reduction=2).fc[0].weight.shape == (8, 16)
    assert BlueprintRegistry.create("transformer", "lora", 64, rank=4).down.weight.shape == (4, 64)
    attention = BlueprintRegistry.create("transformer", "attention", 64, n_head=2)
    assert (attention.n_head, attention.head_dim) == (2, 32)
    assert BlueprintRegistry.create("transformer", "mlp", 64, expansion=2).fc1.weight.shape == (128, 64)
    with pytest.raises(TypeError):
        BlueprintRegistry.create("cnn", "norm", 8, rank=2)


def test_blueprint_spec_record():
    spec = BlueprintRegistry.get("transformer", "lora")
    assert [f.name for f in dataclasses.fields(spec)] == ["name", "topology", "factory", "param_estimate",
                                                          "description"]
    assert hasattr(type(spec), "__slots__")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.param_estimate = 1
    assert spec.actual_param_count(64) == 2 * 64 * 8
    assert BlueprintRegistry.get("cnn", "norm").actual_param_count(16) == 33
    assert BlueprintRegistry.get("transformer", "mlp").actual_param_count(64) == 64 * 256 + 256 + 256 * 64 + 64


def test_register_and_unregister():
    def factory(dim):
        return nn.Identity()

    try:
        assert BlueprintRegistry.register("scratch", "cnn", param_estimate=3000, description="d")(factory) is factory
        spec = BlueprintRegistry.get("cnn", "scratch")
        assert (spec.name, spec.topology, spec.factory, spec.param_estimate, spec.description) == (
            "scratch", "cnn", factory, 3000, "d"
        )
        assert [s.name for s in BlueprintRegistry.list_for_topology("cnn")][2] == "scratch"  # 2000 < 3000 < 4800
        BlueprintRegistry.register("scratch", "cnn", param_estimate=1)(factory)  # same key: replaced
        assert [s.name for s in BlueprintRegistry.list_for_topology("cnn")][0] == "scratch"
    finally:
        BlueprintRegistry.unregister("cnn", "scratch")
    assert [s.name for s in BlueprintRegistry.list_for_topology("cnn")] == CNN_NAMES
    BlueprintRegistry.unregister("cnn", "never_registered")  # a no-op


def test_reset_empties_the_registry():
    saved = dict(BlueprintRegistry._blueprints)
    try:
        BlueprintRegistry.reset()
        assert BlueprintRegistry.list_for_topology("cnn") == []
        assert [m.name for m in leyline_actions.build_action_enum("cnn")] == ["WAIT", "FOSSILIZE", "CULL"]
    finally:
        BlueprintRegistry._blueprints.update(saved)
        leyline_actions._action_enum_cache.clear()
    assert [s.name for s in BlueprintRegistry.list_for_topology("cnn")] == CNN_NAMES


# ============================================================================ blueprint parameters


def shapes(module):
    return [(name, tuple(t.shape)) for name, t in module.state_dict().items()]


CNN_PARAMS = {
    # a module's own parameters come before its children's in state_dict
    ("norm", 16): [("scale", (1,)), ("norm.weight", (16,)), ("norm.bias", (16,))],
    ("norm", 64): [("scale", (1,)), ("norm.weight", (64,)), ("norm.bias", (64,))],
    ("attention", 16): [("fc.0.weight", (4, 16)), ("fc.2.weight", (16, 4))],
    ("attention", 64): [("fc.0.weight", (16, 64)), ("fc.2.weight", (64, 16))],
    ("depthwise", 16): [("depthwise.weight", (16, 1, 3, 3)), ("pointwise.weight", (16, 16, 1, 1)),
                        ("gn.weight", (16,)), ("gn.bias", (16,))],
    ("depthwise", 64): [("depthwise.weight", (64, 1, 3, 3)), ("pointwise.weight", (64, 64, 1, 1)),
                        ("gn.weight", (64,)), ("gn.bias", (64,))],
    ("conv_light", 16): [("enhance.conv.weight", (16, 16, 3, 3)), ("enhance.gn.weight", (16,)),
                         ("enhance.gn.bias", (16,))],
    ("conv_light", 64): [("enhance.conv.weight", (64, 64, 3, 3)), ("enhance.gn.weight", (64,)),
                         ("enhance.gn.bias", (64,))],
    ("conv_heavy", 16): [("enhance.0.conv.weight", (16, 16, 3, 3)), ("enhance.0.gn.weight", (16,)),
                         ("enhance.0.gn.bias", (16,)), ("enhance.1.conv.weight", (16, 16, 3, 3)),
                         ("enhance.1.gn.weight", (16,)), ("enhance.1.gn.bias", (16,))],
    ("conv_heavy", 64): [("enhance.0.conv.weight", (64, 64, 3, 3)), ("enhance.0.gn.weight", (64,)),
                         ("enhance.0.gn.bias", (64,)), ("enhance.1.conv.weight", (64, 64, 3, 3)),
                         ("enhance.1.gn.weight", (64,)), ("enhance.1.gn.bias", (64,))],
}

ATTENTION_64 = [("qkv.weight", (192, 64)), ("qkv.bias", (192,)), ("proj.weight", (64, 64)), ("proj.bias", (64,))]
TRANSFORMER_PARAMS = {
    "norm": [("scale", (1,)), ("norm.weight", (64,)), ("norm.bias", (64,))],
    "lora": [("down.weight", (8, 64)), ("up.weight", (64, 8))],
    "attention": ATTENTION_64,
    "mlp": [("fc1.weight", (256, 64)), ("fc1.bias", (256,)), ("fc2.weight", (64, 256)), ("fc2.bias", (64,))],
    "flex_attention": ATTENTION_64,
}


@pytest.mark.parametrize("name,channels", list(CNN_PARAMS), ids=lambda v: str(v))
def test_cnn_blueprint_parameters(name, channels):
    seed = BlueprintRegistry.create("cnn", name, channels)
    assert shapes(seed) == CNN_PARAMS[name, channels]
    assert list(seed.buffers()) == []  # GroupNorm: no running statistics


@pytest.mark.parametrize("name", list(TRANSFORMER_PARAMS))
def test_transformer_blueprint_parameters(name):
    if name == "flex_attention" and not HAS_FLEX:
        pytest.skip("torch without FlexAttention")
    seed = BlueprintRegistry.create("transformer", name, 64)
    assert shapes(seed) == TRANSFORMER_PARAMS[name]
    assert all(p.requires_grad for p in seed.parameters())


SEED_CLASSES = [
    ("cnn", "norm", "NormSeed"), ("cnn", "attention", "AttentionSeed"), ("cnn", "depthwise", "DepthwiseSeed"),
    ("cnn", "conv_light", "ConvLightSeed"), ("cnn", "conv_heavy", "ConvHeavySeed"),
    ("transformer", "norm", "TransformerNormSeed"), ("transformer", "lora", "LoRASeed"),
    ("transformer", "attention", "TransformerAttentionSeed"), ("transformer", "mlp", "TransformerMLPSeed"),
    *([("transformer", "flex_attention", "FlexAttentionSeed")] if HAS_FLEX else []),
]


@pytest.mark.parametrize("topology,name,class_name", SEED_CLASSES)
def test_seed_class_names(topology, name, class_name):
    seed = BlueprintRegistry.create(topology, name, 16)
    assert type(seed).__name__ == class_name
    if name in ("conv_light", "conv_heavy"):
        blocks = [seed.enhance] if name == "conv_light" else list(seed.enhance)
        assert all(type(b).__name__ == "SeedConvBlock" for b in blocks)


def test_seeds_share_one_module_level_class_and_pickle():
    # The original makes a new local class per seed, which cannot be pickled: docs/COMPAT.md #24.
    a, b = BlueprintRegistry.create("cnn", "norm", 8), BlueprintRegistry.create("cnn", "norm", 8)
    assert type(a) is type(b) and type(a).__name__ == "NormSeed"
    restored = pickle.loads(pickle.dumps(a))
    assert torch.equal(restored.scale, a.scale)


@pytest.mark.parametrize(
    "channels,target,groups",
    [(16, 16, 1), (32, 16, 2), (48, 16, 2), (64, 16, 4), (128, 16, 8), (256, 16, 16), (512, 16, 32),
     (1024, 16, 32), (8, 16, 8), (12, 16, 4), (7, 16, 1), (24, 4, 4), (3, 16, 1)],
)
def test_get_num_groups(channels, target, groups):
    assert get_num_groups(channels, target_group_size=target) == groups


@pytest.mark.parametrize(
    "channels,norm_groups,seed_groups", [(16, 16, 1), (64, 32, 4), (8, 8, 8)]
)
def test_groupnorm_group_counts_of_the_seeds(channels, norm_groups, seed_groups):
    assert BlueprintRegistry.create("cnn", "norm", channels).norm.num_groups == norm_groups  # min(32, channels)
    assert BlueprintRegistry.create("cnn", "depthwise", channels).gn.num_groups == seed_groups
    assert BlueprintRegistry.create("cnn", "conv_light", channels).enhance.gn.num_groups == seed_groups
    heavy = BlueprintRegistry.create("cnn", "conv_heavy", channels).enhance
    assert heavy[0].gn.num_groups == heavy[1].gn.num_groups == seed_groups


@pytest.mark.parametrize("name", ["lora", "attention", "mlp", "flex_attention"])
def test_zero_initialised_projections_make_the_seed_start_as_the_identity(name):
    if name == "flex_attention" and not HAS_FLEX:
        pytest.skip("torch without FlexAttention")
    seed = BlueprintRegistry.create("transformer", name, 64)
    zero = {"lora": ["up.weight"], "mlp": ["fc2.weight", "fc2.bias"]}.get(name, ["proj.weight", "proj.bias"])
    params = dict(seed.named_parameters())
    for key in zero:
        assert torch.count_nonzero(params[key]) == 0, key
    for key in set(params) - set(zero):
        assert torch.count_nonzero(params[key]) > 0, key
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert torch.equal(seed(x), x)


def test_norm_seeds_start_as_the_normalised_features():
    # scale starts at 1: x + 1 * (norm(x) - x), the normalisation's output rather than the identity
    x = torch.randn(2, 16, 4, 4) * 3 + 1
    cnn = BlueprintRegistry.create("cnn", "norm", 16)
    assert cnn.scale.item() == 1.0
    torch.testing.assert_close(cnn(x), F.group_norm(x, 16), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cnn(x), x)
    h = torch.randn(2, 5, 64) * 3 + 1
    transformer = BlueprintRegistry.create("transformer", "norm", 64)
    torch.testing.assert_close(transformer(h), F.layer_norm(h, (64,)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels", [33, 48, 100])
def test_the_cnn_norm_seed_needs_channels_divisible_by_its_groups(channels):
    with pytest.raises(ValueError, match="divisible"):
        BlueprintRegistry.create("cnn", "norm", channels)  # GroupNorm(min(32, channels), channels)


def test_cnn_attention_seed_is_a_channel_gate():
    seed = BlueprintRegistry.create("cnn", "attention", 16)
    x = torch.randn(2, 16, 4, 4)
    gate = torch.sigmoid(seed.fc[2](torch.relu(seed.fc[0](x.mean((2, 3))))))
    torch.testing.assert_close(seed(x), x * gate[:, :, None, None])


@pytest.mark.parametrize("name", CNN_NAMES)
@pytest.mark.parametrize("channels", [1, 3, 16, 48])
def test_cnn_blueprints_preserve_shape(name, channels):
    if (name, channels) == ("norm", 48):
        pytest.skip("the norm seed needs channels divisible by min(32, channels); see the next test")
    seed = BlueprintRegistry.create("cnn", name, channels)
    for x in (torch.randn(2, channels, 7, 5), torch.randn(3, channels, 4, 4).to(memory_format=torch.channels_last)):
        y = seed(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
    y.sum().backward()
    assert any(p.grad is not None for p in seed.parameters())


@pytest.mark.parametrize("name", TRANSFORMER_PLAIN)
@pytest.mark.parametrize("dim", [8, 32, 36])
def test_transformer_blueprints_preserve_shape(name, dim):
    seed = BlueprintRegistry.create("transformer", name, dim)
    for t in (1, 5):
        x = torch.randn(2, t, dim)
        y = seed(x)
        assert y.shape == x.shape and torch.isfinite(y).all()


def changed_after(x, position):
    x2 = x.clone()
    x2[:, position:] += 1.0
    return x2


def test_transformer_attention_seed_is_not_causal():
    seed = BlueprintRegistry.create("transformer", "attention", 16)
    nn.init.normal_(seed.proj.weight)
    x = torch.randn(1, 6, 16)
    y, y2 = seed(x), seed(changed_after(x, 4))
    assert not torch.allclose(y[:, 0], y2[:, 0])  # position 0 sees positions 4 and 5


@needs_flex
def test_flex_attention_seed_is_causal():
    seed = BlueprintRegistry.create("transformer", "flex_attention", 16)
    nn.init.normal_(seed.proj.weight)
    x = torch.randn(1, 6, 16)
    with torch.no_grad():  # forward only: FlexAttention has no CPU backward
        y, y2 = seed(x), seed(changed_after(x, 4))
    assert torch.equal(y[:, :4], y2[:, :4])
    assert not torch.allclose(y[:, 4:], y2[:, 4:])


@needs_flex
def test_flex_attention_caches_at_most_eight_block_masks():
    seed = BlueprintRegistry.create("transformer", "flex_attention", 8, n_head=2)
    with torch.no_grad():
        for t in range(1, 10):
            seed(torch.randn(1, t, 8))
        seed(torch.randn(1, 9, 8))
    assert seed._MAX_CACHE_SIZE == 8
    assert list(seed._block_mask_cache) == [(t, "cpu", "torch.float32") for t in range(2, 10)]  # oldest out


def count_fc1_calls(seed):
    calls = []
    seed.fc1.register_forward_hook(lambda *args: calls.append(1))
    return calls


@pytest.mark.parametrize(
    "checkpoint,training,input_grad,calls",
    [(False, True, True, 1), (True, True, True, 2), (True, False, True, 1), (True, True, False, 1)],
)
def test_mlp_checkpoint_recomputes_only_in_training_with_grad(checkpoint, training, input_grad, calls):
    torch.manual_seed(3)
    seed = BlueprintRegistry.create("transformer", "mlp", 16, checkpoint=checkpoint)
    nn.init.normal_(seed.fc2.weight)
    torch.manual_seed(3)
    plain = BlueprintRegistry.create("transformer", "mlp", 16)
    nn.init.normal_(plain.fc2.weight)
    assert seed.use_checkpoint is checkpoint and plain.use_checkpoint is False
    seed.train(training)
    counted = count_fc1_calls(seed)
    x = torch.randn(2, 3, 16, requires_grad=input_grad)
    y = seed(x)
    y.sum().backward()
    assert len(counted) == calls  # a checkpointed branch runs fc1 again in backward
    torch.testing.assert_close(y, plain(x))
    plain(x).sum().backward()
    torch.testing.assert_close(seed.fc1.weight.grad, plain.fc1.weight.grad)


# ============================================================================ initialisation order


def reference_cnn_seed(name, c):
    """The seed's layers built by hand, in the original's construction order."""
    if name == "norm":
        gn = nn.GroupNorm(min(32, c), c)
        return {"scale": torch.ones(1), "norm.weight": gn.weight, "norm.bias": gn.bias}
    if name == "attention":
        down, up = nn.Linear(c, c // 4, bias=False), nn.Linear(c // 4, c, bias=False)
        return {"fc.0.weight": down.weight, "fc.2.weight": up.weight}
    if name == "depthwise":
        dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        pw = nn.Conv2d(c, c, 1, bias=False)
        gn = nn.GroupNorm(get_num_groups(c), c)
        return {"depthwise.weight": dw.weight, "pointwise.weight": pw.weight, "gn.weight": gn.weight,
                "gn.bias": gn.bias}
    blocks = 1 if name == "conv_light" else 2
    out = {}
    for i in range(blocks):
        conv, gn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(get_num_groups(c), c)
        prefix = "enhance." if blocks == 1 else f"enhance.{i}."
        out.update({f"{prefix}conv.weight": conv.weight, f"{prefix}gn.weight": gn.weight,
                    f"{prefix}gn.bias": gn.bias})
    return out


def reference_transformer_seed(name, d):
    if name == "norm":
        ln = nn.LayerNorm(d)
        return {"scale": torch.ones(1), "norm.weight": ln.weight, "norm.bias": ln.bias}
    if name == "lora":
        down, up = nn.Linear(d, 8, bias=False), nn.Linear(8, d, bias=False)
        return {"down.weight": down.weight, "up.weight": torch.zeros_like(up.weight)}
    if name == "mlp":
        fc1, fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        return {"fc1.weight": fc1.weight, "fc1.bias": fc1.bias, "fc2.weight": torch.zeros_like(fc2.weight),
                "fc2.bias": torch.zeros_like(fc2.bias)}
    qkv, proj = nn.Linear(d, 3 * d), nn.Linear(d, d)  # attention and flex_attention
    return {"qkv.weight": qkv.weight, "qkv.bias": qkv.bias, "proj.weight": torch.zeros_like(proj.weight),
            "proj.bias": torch.zeros_like(proj.bias)}


def assert_same_tensors(actual: dict, expected: dict):
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def assert_same_rng_use(build, build_reference, seed=1234):
    torch.manual_seed(seed)
    module = build()
    after = torch.rand(8)
    torch.manual_seed(seed)
    reference = build_reference()
    assert torch.equal(after, torch.rand(8)), "a different number of random draws"
    return module, reference


@pytest.mark.parametrize("name", CNN_NAMES)
@pytest.mark.parametrize("channels", [16, 64])
def test_cnn_seed_initialisation(name, channels):
    seed, reference = assert_same_rng_use(
        lambda: BlueprintRegistry.create("cnn", name, channels), lambda: reference_cnn_seed(name, channels)
    )
    assert_same_tensors(seed.state_dict(), reference)


@pytest.mark.parametrize("name", TRANSFORMER_NAMES)
def test_transformer_seed_initialisation(name):
    seed, reference = assert_same_rng_use(
        lambda: BlueprintRegistry.create("transformer", name, 64), lambda: reference_transformer_seed(name, 64)
    )
    assert_same_tensors(seed.state_dict(), reference)


def reference_cnn_host(num_classes, n_blocks, base):
    out, c_in = {}, 3
    for i in range(n_blocks):
        c = base * 2**i
        conv, bn = nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        out[f"blocks.{i}.conv.weight"] = conv.weight
        out.update({f"blocks.{i}.bn.{k}": v for k, v in bn.state_dict().items()})
        c_in = c
    classifier = nn.Linear(c_in, num_classes)
    out.update({"classifier.weight": classifier.weight, "classifier.bias": classifier.bias})
    return out


@pytest.mark.parametrize("num_classes,n_blocks,base", [(10, 3, 8), (7, 2, 4), (10, 4, 2)])
def test_cnn_host_initialisation(num_classes, n_blocks, base):
    host, reference = assert_same_rng_use(
        lambda: CNNHost(num_classes=num_classes, n_blocks=n_blocks, base_channels=base),
        lambda: reference_cnn_host(num_classes, n_blocks, base),
    )
    assert_same_tensors(host.state_dict(), reference)


def reference_transformer_host(vocab, d, n_layer, block):
    tok, pos = nn.Embedding(vocab, d), nn.Embedding(block, d)
    out = {"tok_emb.weight": tok.weight, "pos_emb.weight": pos.weight}
    for i in range(n_layer):
        ln1, c_attn, c_proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        ln2, c_fc, mlp_proj = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        for prefix, layer in (("ln1", ln1), ("attn.c_attn", c_attn), ("attn.c_proj", c_proj), ("ln2", ln2),
                              ("mlp.c_fc", c_fc), ("mlp.c_proj", mlp_proj)):
            out[f"layers.{i}.{prefix}.weight"] = layer.weight
            out[f"layers.{i}.{prefix}.bias"] = layer.bias
    ln_f = nn.LayerNorm(d)
    nn.Linear(d, vocab, bias=False)  # the head draws its own init before being tied to tok_emb
    out.update({"ln_f.weight": ln_f.weight, "ln_f.bias": ln_f.bias, "head.weight": tok.weight})
    return out


def test_transformer_host_initialisation():
    host, reference = assert_same_rng_use(
        lambda: small_transformer(vocab_size=50, n_embd=16, n_head=2, n_layer=2, block_size=8),
        lambda: reference_transformer_host(50, 16, 2, 8),
    )
    assert_same_tensors(host.state_dict(), reference)


def test_model_construction_draws_only_the_hosts_randomness():
    model, reference = assert_same_rng_use(
        lambda: MorphogeneticModel(CNNHost(base_channels=4)), lambda: reference_cnn_host(10, 3, 4)
    )
    host_state = {k: v for k, v in model.host.state_dict().items() if "slots" not in k}
    assert_same_tensors(host_state, reference)


def test_transformer_host_embedding_init_default_and_gpt():
    default = small_transformer(vocab_size=512)
    assert 0.9 < default.tok_emb.weight.std().item() < 1.1  # PyTorch's N(0, 1)
    assert 0.9 < default.pos_emb.weight.std().item() < 1.1
    gpt = small_transformer(vocab_size=512, init="gpt")
    for weight in (gpt.tok_emb.weight, gpt.pos_emb.weight, gpt.layers[0].attn.c_attn.weight,
                   gpt.layers[1].mlp.c_proj.weight):
        assert 0.017 < weight.std().item() < 0.023
    assert torch.count_nonzero(gpt.layers[0].mlp.c_fc.bias) == 0
    assert gpt.head.weight is gpt.tok_emb.weight
    assert inspect.signature(TransformerHost).parameters["init"].kind is inspect.Parameter.KEYWORD_ONLY
    with pytest.raises(ValueError, match="init"):
        small_transformer(init="xavier")


# ============================================================================ alpha schedule


def test_alpha_schedule_endpoints_and_midpoint():
    schedule = AlphaSchedule(10)
    assert (schedule.total_steps, schedule.start, schedule.end, schedule.temperature) == (10, 0.0, 1.0, 1.0)
    assert schedule(-3) == schedule(0) == 0.0
    assert schedule(10) == schedule(50) == 1.0
    assert schedule(5) == pytest.approx(0.5)
    assert schedule(3) == pytest.approx(1 / (1 + math.exp(2.0)))
    custom = AlphaSchedule(4, start=0.2, end=0.6, temperature=0.5)
    assert custom(0) == 0.2 and custom(4) == 0.6 and custom(2) == pytest.approx(0.4)
    assert custom(1) == pytest.approx(0.2 + 0.4 / (1 + math.exp(2.0)))


@pytest.mark.parametrize("total_steps,temperature", [(1, 1.0), (5, 1.0), (20, 3.0), (7, 0.0)])
def test_alpha_schedule_is_monotonic_within_bounds(total_steps, temperature):
    schedule = AlphaSchedule(total_steps, temperature=temperature)
    values = [schedule(step) for step in range(-1, total_steps + 2)]
    assert values == sorted(values)
    assert all(0.0 <= v <= 1.0 for v in values)


def test_alpha_schedule_guards_degenerate_arguments():
    schedule = AlphaSchedule(0, temperature=-1.0)
    assert schedule.total_steps == 1 and schedule.temperature == 1e-6
    assert schedule(1) == 1.0


# ============================================================================ join operators


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_blend_with_isolation_is_torch_lerp(dtype, device):
    host = torch.randn(4, 5, device=device, dtype=dtype, requires_grad=True)
    seed = torch.randn(4, 5, device=device, dtype=dtype, requires_grad=True)
    for alpha in (0.0, 0.3, 0.5, 0.75, 1.0):
        y, expected = blend_with_isolation(host, seed, alpha), torch.lerp(host, seed, alpha)
        if device == "cpu":
            assert torch.equal(y, expected)  # bit for bit torch.lerp
        else:
            assert_close(y, expected, what=f"blend at alpha {alpha}")
    y = blend_with_isolation(host, seed, 0.3, detach_host=False)
    y.sum().backward()
    torch.testing.assert_close(host.grad, torch.full_like(host, 0.7))
    torch.testing.assert_close(seed.grad, torch.full_like(seed, 0.3))
    host.grad = seed.grad = None
    blend_with_isolation(host, seed, 1.7).sum().backward()  # alpha clamps to 1; host detached by default
    assert host.grad is None
    torch.testing.assert_close(seed.grad, torch.ones_like(seed))


def test_ste_forward_values_and_gradients(device):
    host = torch.randn(3, 4, device=device, requires_grad=True)
    seed = torch.randn(3, 4, device=device, requires_grad=True)
    y = ste_forward(host, seed)
    assert torch.equal(y, host) and y is not host
    g = torch.randn(3, 4, device=device)
    y.backward(g)
    assert torch.equal(host.grad, g) and torch.equal(seed.grad, g)


# ============================================================================ hosts


def test_conv_block():
    block = ConvBlock(3, 8)
    assert block.conv.bias is None and block.conv.padding == (1, 1) and block.conv.kernel_size == (3, 3)
    assert [name for name, _ in block.named_buffers()] == ["bn.running_mean", "bn.running_var",
                                                           "bn.num_batches_tracked"]
    assert ConvBlock(3, 8, kernel_size=5).conv.padding == (2, 2)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(block(x), F.relu(block.bn(block.conv(x))))


def test_conv_block_without_running_stats_has_no_buffers():
    block = ConvBlock(3, 8, track_running_stats=False)
    assert list(block.buffers()) == []
    assert block.bn.running_mean is None and block.bn.running_var is None
    x = torch.randn(4, 3, 6, 6)
    train_out = block(x)
    torch.testing.assert_close(block.eval()(x), train_out)  # batch statistics in eval too


def test_cnn_host_signature_and_attributes():
    params = inspect.signature(CNNHost).parameters
    assert [(n, p.default) for n, p in params.items()] == [
        ("num_classes", 10), ("n_blocks", 3), ("base_channels", 32), ("memory_format", torch.channels_last)
    ]
    host = CNNHost(num_classes=7, n_blocks=4, base_channels=4)
    assert (host.n_blocks, host.base_channels, host._memory_format) == (4, 4, torch.channels_last)
    assert host._slot_indices == (1, 2, 3)
    assert host._slot_keys == ("block2_post", "block3_post", "block4_post")
    assert host.injection_points == {"block2_post": 8, "block3_post": 16, "block4_post": 32}
    assert [b.conv.out_channels for b in host.blocks] == [4, 8, 16, 32]
    assert [b.conv.in_channels for b in host.blocks] == [3, 4, 8, 16]
    assert (host.classifier.in_features, host.classifier.out_features) == (32, 7)
    assert isinstance(host.pool, nn.MaxPool2d) and host.pool.kernel_size == 2 and host.pool.stride == 2
    assert all(isinstance(host.slots[k], nn.Identity) for k in host._slot_keys)
    assert CNNHost().injection_points == {"block2_post": 64, "block3_post": 128}


def test_cnn_host_needs_two_blocks():
    with pytest.raises(ValueError, match="^CNNHost requires at least 2 blocks to expose an injection point$"):
        CNNHost(n_blocks=1)
    assert CNNHost(n_blocks=2, base_channels=2).injection_points == {"block2_post": 4}


def test_cnn_host_register_and_unregister():
    host = CNNHost(base_channels=4)
    with pytest.raises(ValueError, match="^Unknown injection point: block1_post$"):
        host.register_slot("block1_post", nn.Identity())
    with pytest.raises(ValueError, match="^Unknown injection point: block1_post$"):
        host.unregister_slot("block1_post")
    slot = nn.Linear(2, 2)
    host.register_slot("block3_post", slot)
    assert host.slots["block3_post"] is slot
    host.unregister_slot("block3_post")
    assert isinstance(host.slots["block3_post"], nn.Identity)
    host.to("meta")
    host.register_slot("block2_post", nn.Linear(2, 2))
    assert host.slots["block2_post"].weight.device.type == "meta"  # moved to the host's device


@pytest.mark.parametrize("size,classes", [(32, 10), (16, 3), (8, 5)])
def test_cnn_host_forward_shape(size, classes):
    host = CNNHost(num_classes=classes, base_channels=4)
    assert host(torch.randn(2, 3, size, size)).shape == (2, classes)


class Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x)
        return x


def test_cnn_host_converts_the_input_not_its_parameters_to_channels_last():
    host = CNNHost(base_channels=4)
    weight = host.blocks[1].conv.weight
    assert weight.is_contiguous() and not weight.is_contiguous(memory_format=torch.channels_last)
    assert all(p.is_contiguous() for p in host.parameters())
    recorder = Recorder()
    host.register_slot("block2_post", recorder)
    x = torch.randn(2, 3, 16, 16)
    out = host(x)
    seen = recorder.seen[0]
    assert seen.shape == (2, 8, 4, 4) and seen.is_contiguous(memory_format=torch.channels_last)
    assert not seen.is_contiguous()
    assert all(p.is_contiguous() for p in host.parameters())  # forward leaves the parameters alone

    plain = CNNHost(base_channels=4, memory_format=torch.contiguous_format)
    plain.load_state_dict(host.state_dict())
    plain_recorder = Recorder()
    plain.register_slot("block2_post", plain_recorder)
    torch.testing.assert_close(plain(x), out, rtol=1e-5, atol=1e-5)
    assert plain_recorder.seen[0].is_contiguous()


def test_transformer_host_signature_and_attributes():
    params = inspect.signature(TransformerHost).parameters
    assert [(n, p.default) for n, p in params.items()][:6] == [
        ("vocab_size", 50257), ("n_embd", 384), ("n_head", 6), ("n_layer", 6), ("block_size", 256), ("dropout", 0.1)
    ]
    host = small_transformer(n_layer=3)
    assert (host.n_layer, host.n_embd, host.block_size) == (3, 32, 16)
    assert host._slot_keys == ("layer_0_post_block", "layer_1_post_block", "layer_2_post_block")
    assert host.injection_points == {k: 32 for k in host._slot_keys}
    assert host.head.weight is host.tok_emb.weight and host.head.bias is None
    assert host.layers[0].attn.n_head == 2 and host.layers[0].attn.head_dim == 16
    with pytest.raises(ValueError, match="^Unknown injection point: layer_3_post_block$"):
        host.register_slot("layer_3_post_block", nn.Identity())
    with pytest.raises(ValueError, match="^Unknown injection point: nowhere$"):
        host.unregister_slot("nowhere")


def test_transformer_host_forward():
    host = small_transformer()
    tokens = torch.randint(0, 64, (3, 16))
    assert host(tokens).shape == (3, 16, 64)
    assert host(tokens[:, :5]).shape == (3, 5, 64)
    with pytest.raises(ValueError, match="^Sequence length 17 exceeds block_size 16$"):
        host(torch.randint(0, 64, (1, 17)))
    recorder = Recorder()
    host.register_slot("layer_1_post_block", recorder)
    host(tokens)
    assert recorder.seen[0].shape == (3, 16, 32)


def test_transformer_host_is_causal():
    host = small_transformer().eval()
    tokens = torch.randint(0, 64, (1, 10))
    changed = tokens.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % 64
    torch.testing.assert_close(host(changed)[:, :7], host(tokens)[:, :7])
    assert not torch.allclose(host(changed)[:, 7:], host(tokens)[:, 7:])


def test_hosts_satisfy_the_host_protocol():
    assert isinstance(CNNHost(base_channels=2), HostProtocol)
    assert isinstance(small_transformer(), HostProtocol)
    assert not isinstance(nn.Linear(2, 2), HostProtocol)


# ============================================================================ MorphogeneticModel


def test_model_signature_and_wiring():
    params = inspect.signature(MorphogeneticModel).parameters
    assert [(n, p.default) for n, p in params.items()] == [
        ("host", inspect.Parameter.empty), ("device", "cpu"), ("slot_id", None), ("task_config", None),
        ("fast_mode", False), ("slots", None),
    ]
    assert params["slots"].kind is inspect.Parameter.KEYWORD_ONLY  # an option after the original's five
    config = TaskConfig.for_cifar10()
    model = MorphogeneticModel(CNNHost(base_channels=4), task_config=config)
    assert model.slot_id == "block2_post" and model._device == "cpu" and model.task_config is config
    slot = model.seed_slot
    assert isinstance(slot, SeedSlot) and model.host.slots["block2_post"] is slot
    assert isinstance(model.host.slots["block3_post"], nn.Identity)
    assert (slot.slot_id, slot.channels, slot.device, slot.task_config, slot.fast_mode) == (
        "block2_post", 8, torch.device("cpu"), config, False
    )
    assert not model.has_active_seed and model.seed_state is None and model.active_seed_params == 0
    assert MorphogeneticModel(CNNHost(base_channels=4), fast_mode=True).seed_slot.fast_mode is True


def test_model_slot_choice():
    model = MorphogeneticModel(CNNHost(base_channels=4), slot_id="block3_post")
    assert model.host.slots["block3_post"] is model.seed_slot and model.seed_slot.channels == 16
    transformer = MorphogeneticModel(small_transformer(), slot_id="layer_1_post_block")
    assert transformer.seed_slot.channels == 32


class NoPoints(nn.Module):
    pass


class EmptyPoints(nn.Module):
    injection_points = {}


class NoRegister(nn.Module):
    injection_points = {"a": 4}


@pytest.mark.parametrize(
    "host,slot_id,message",
    [
        (NoPoints(), None, "Host must expose injection_points mapping for seed slots"),
        (EmptyPoints(), None, "Host injection_points mapping must not be empty"),
        (NoRegister(), None, "Host must implement register_slot(slot_id, module)"),
        (CNNHost(base_channels=4), "nowhere",
         "Slot 'nowhere' not found in host injection points: ['block2_post', 'block3_post']"),
    ],
    ids=["no_points", "empty", "no_register", "bad_slot"],
)
def test_model_errors(host, slot_id, message):
    with pytest.raises(ValueError) as info:
        MorphogeneticModel(host, slot_id=slot_id)
    assert str(info.value) == message


def test_model_to_updates_the_slot_device():
    model = MorphogeneticModel(CNNHost(base_channels=4))
    assert model.to(torch.float64) is model
    assert model.seed_slot.device == torch.device("cpu") and model._device == "cpu"
    model.to("meta")
    assert model.seed_slot.device == torch.device("meta") and model._device == "meta"
    model.germinate_seed("norm", "s")
    assert model.seed_slot.seed.scale.device.type == "meta"


def test_every_move_updates_the_slot_device():
    # The original updates it in .to() only: docs/COMPAT.md #16.
    model = MorphogeneticModel(CNNHost(base_channels=4))
    model.to_empty(device="meta")
    assert model.seed_slot.device == torch.device("meta") and model._device == "meta"


def test_model_host_and_seed_parameters():
    model = MorphogeneticModel(CNNHost(base_channels=4))
    host_params = list(model.get_host_parameters())
    assert host_params == list(model.host.parameters())  # nothing in the slots yet
    assert list(model.get_seed_parameters()) == []
    model.germinate_seed("conv_light", "seed-1")
    assert model.has_active_seed and model.seed_state.seed_id == "seed-1"
    assert model.seed_state.stage == SeedStage.GERMINATED
    seed_params = list(model.get_seed_parameters())
    assert model.active_seed_params == sum(p.numel() for p in seed_params) == 8 * 8 * 9 + 16
    expected_host = [p for name, p in model.host.named_parameters() if "slots" not in name]
    assert [id(p) for p in model.get_host_parameters()] == [id(p) for p in expected_host]
    assert [id(p) for p in model.get_host_parameters()] == [id(p) for p in host_params]
    assert {id(p) for p in model.parameters()} == {id(p) for p in host_params + seed_params}
    model.cull_seed()
    assert not model.has_active_seed and model.seed_state is None and list(model.get_seed_parameters()) == []


def test_germinate_seed_registers_the_isolation_monitor():
    model = MorphogeneticModel(CNNHost(base_channels=4))
    model.germinate_seed("norm", "s")
    monitor = model.seed_slot.isolation_monitor
    assert isinstance(monitor, GradientIsolationMonitor)
    # the host's parameters at germination: the slot lives inside the host, so the seed's are included
    assert [id(p) for p in monitor._host_params] == [id(p) for p in model.host.parameters()]
    assert [id(p) for p in monitor._seed_params] == [id(p) for p in model.get_seed_parameters()]
    fast = MorphogeneticModel(CNNHost(base_channels=4), fast_mode=True)
    fast.germinate_seed("norm", "s")
    assert fast.seed_slot.isolation_monitor is None


def test_model_forward_with_seed_through_the_lifecycle():
    model = MorphogeneticModel(CNNHost(base_channels=4))
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    baseline = model(x)
    model.germinate_seed("conv_light", "s")
    assert torch.equal(model(x), baseline)  # GERMINATED: the seed does not run
    model.seed_slot.advance_stage(SeedStage.TRAINING)
    assert torch.equal(model(x), baseline)  # STE: value unchanged
    model.seed_slot.state.transition(SeedStage.BLENDING)
    model.seed_slot.set_alpha(1.0)
    assert not torch.allclose(model(x), baseline)
    with model.seed_slot.force_alpha(0.0):
        assert torch.equal(model(x), baseline)


def test_model_training_step_reaches_host_and_seed():
    model = MorphogeneticModel(CNNHost(base_channels=4))
    model.germinate_seed("norm", "s")
    model.seed_slot.advance_stage(SeedStage.TRAINING)
    loss = F.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None for p in model.get_host_parameters())
    assert all(p.grad is not None for p in model.get_seed_parameters())


def test_transformer_model_germinates_transformer_blueprints_only_with_a_task_config():
    configured = MorphogeneticModel(small_transformer(), task_config=TaskConfig.for_tinystories())
    configured.germinate_seed("lora", "s")
    configured.seed_slot.advance_stage(SeedStage.TRAINING)
    assert configured(torch.randint(0, 64, (2, 8))).shape == (2, 8, 64)
    with pytest.raises(AssertionError, match="Blueprint 'conv_light' not available for topology 'transformer'"):
        MorphogeneticModel(small_transformer(), task_config=TaskConfig.for_tinystories()).germinate_seed(
            "conv_light", "x")
    bare = MorphogeneticModel(small_transformer())  # no task_config: the slot's topology is cnn
    with pytest.raises(AssertionError, match="Blueprint 'lora' not available for topology 'cnn'"):
        bare.germinate_seed("lora", "s")


def test_model_state_dict_holds_the_seed_under_both_prefixes():
    model = MorphogeneticModel(CNNHost(base_channels=4))
    model.germinate_seed("depthwise", "s")
    keys = list(model.state_dict())
    seed_keys = ["depthwise.weight", "pointwise.weight", "gn.weight", "gn.bias"]
    assert [k for k in keys if k.startswith("seed_slot.")] == ["seed_slot._extra_state"] + [
        f"seed_slot.seed.{k}" for k in seed_keys
    ]
    assert [k for k in keys if k.startswith("host.slots.")] == ["host.slots.block2_post._extra_state"] + [
        f"host.slots.block2_post.seed.{k}" for k in seed_keys
    ]
    clone = MorphogeneticModel(CNNHost(base_channels=4))
    clone.germinate_seed("depthwise", "s")
    clone.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    model.eval(), clone.eval()
    for m in (model, clone):
        m.seed_slot.state.transition(SeedStage.TRAINING)
    assert torch.equal(clone(x), model(x))


def test_slot_registers_its_seed_as_a_submodule():
    slot = SeedSlot("s", 4)
    slot.germinate("norm")
    assert [n for n, _ in slot.named_parameters()] == ["seed.scale", "seed.norm.weight", "seed.norm.bias"]
    slot.cull()
    assert list(slot.parameters()) == []
