"""Task presets (runtime), their configs, the dataset loaders (utils.data, mock mode) and
create_model, as the original esper-lite defines them."""

import dataclasses
import inspect

import pytest
import torch
from torch.utils.data import DataLoader

import esper_fast.utils as utils
from esper_fast.kasmina import CNNHost, MorphogeneticModel, TransformerHost
from esper_fast.leyline import build_action_enum
from esper_fast.runtime import LossRewardConfig, TaskConfig, TaskSpec, get_task_spec
from esper_fast.tolaria import create_model
from esper_fast.utils.data import TinyStoriesDataset, load_cifar10, load_tinystories

CUDA = torch.cuda.is_available()


# ============================================================================ TaskSpec


def test_task_spec_is_a_slots_dataclass_with_the_originals_fields():
    fields = dataclasses.fields(TaskSpec)
    assert [f.name for f in fields] == [
        "name", "topology", "task_type", "model_factory", "dataloader_factory", "dataloader_defaults",
        "task_config", "loss_reward_config", "vocab_size", "num_classes", "block_size", "action_enum",
    ]
    assert hasattr(TaskSpec, "__slots__")
    by_name = {f.name: f for f in fields}
    assert by_name["action_enum"].init is False
    assert all(by_name[n].init for n in by_name if n != "action_enum")
    assert inspect.signature(TaskSpec.create_model).parameters["device"].default == "cuda:0"


def test_task_spec_defaults_and_action_enum():
    spec = TaskSpec(name="t", topology="transformer", task_type="lm", model_factory=lambda d: d,
                    dataloader_factory=lambda **kw: kw)
    assert spec.dataloader_defaults == {}
    assert spec.task_config == TaskConfig.for_cifar10()
    assert spec.loss_reward_config == LossRewardConfig.default() == LossRewardConfig()
    assert (spec.vocab_size, spec.num_classes, spec.block_size) == (None, None, None)
    assert spec.action_enum is build_action_enum("transformer")  # built in __post_init__ (cached)
    with pytest.raises(TypeError):
        TaskSpec("t", "cnn", "lm", None, None, action_enum=None)
    with pytest.raises(AttributeError):
        spec.not_a_field = 1


def test_create_model_and_create_dataloaders_delegate():
    calls = []
    spec = TaskSpec(name="t", topology="cnn", task_type="classification",
                    model_factory=lambda device: calls.append(device) or "model",
                    dataloader_factory=lambda **params: params,
                    dataloader_defaults={"batch_size": 8, "mock": False})
    assert spec.create_model() == "model" and spec.create_model("cpu") == "model"
    assert calls == ["cuda:0", "cpu"]
    assert spec.create_dataloaders() == {"batch_size": 8, "mock": False}
    assert spec.create_dataloaders(mock=True, extra=1) == {"batch_size": 8, "mock": True, "extra": 1}
    assert spec.dataloader_defaults == {"batch_size": 8, "mock": False}  # not modified


# ============================================================================ configs


def test_task_config_fields_and_presets():
    assert [(f.name, f.default) for f in dataclasses.fields(TaskConfig)][6:] == [
        ("max_steps", 10000), ("shadowing_fraction", 0.1), ("train_to_blend_fraction", 0.1), ("blending_steps", 5)
    ]
    assert [f.name for f in dataclasses.fields(TaskConfig)][:6] == [
        "task_type", "topology", "baseline_loss", "target_loss", "typical_loss_delta_std", "max_epochs"
    ]
    assert TaskConfig.for_cifar10() == TaskConfig(
        task_type="classification", topology="cnn", baseline_loss=2.3, target_loss=0.3,
        typical_loss_delta_std=0.05, max_epochs=25, max_steps=10000, shadowing_fraction=0.1,
        train_to_blend_fraction=0.1, blending_steps=5,
    )
    assert TaskConfig.for_tinystories() == TaskConfig(
        task_type="lm", topology="transformer", baseline_loss=10.8, target_loss=3.5,
        typical_loss_delta_std=0.15, max_epochs=50, max_steps=50000, shadowing_fraction=0.1,
        train_to_blend_fraction=0.1, blending_steps=5,
    )
    assert TaskConfig.for_cifar10().achievable_range == pytest.approx(2.0)
    assert TaskConfig.for_tinystories().achievable_range == pytest.approx(7.3)


def test_loss_reward_config_defaults_and_presets():
    assert [(f.name, f.default) for f in dataclasses.fields(LossRewardConfig)] == [
        ("loss_delta_weight", 5.0), ("max_loss_delta", 5.0), ("regression_penalty_scale", 0.5),
        ("typical_loss_delta_std", 0.1), ("compute_rent_weight", 0.05), ("max_rent_penalty", 5.0),
        ("grace_epochs", 3), ("stage_potential_weight", 0.1), ("baseline_loss", 2.3), ("target_loss", 0.3),
        ("terminal_loss_weight", 1.0),
    ]
    assert LossRewardConfig.for_cifar10() == LossRewardConfig(baseline_loss=2.3, target_loss=0.3,
                                                              typical_loss_delta_std=0.05)
    assert LossRewardConfig.for_tinystories() == LossRewardConfig(
        baseline_loss=10.8, target_loss=3.5, typical_loss_delta_std=0.15, compute_rent_weight=0.01
    )
    assert LossRewardConfig().achievable_range == pytest.approx(2.0)


# ============================================================================ presets


def test_cifar10_preset():
    spec = get_task_spec("cifar10")
    assert isinstance(spec, TaskSpec)
    assert (spec.name, spec.topology, spec.task_type) == ("cifar10", "cnn", "classification")
    assert (spec.num_classes, spec.vocab_size, spec.block_size) == (10, None, None)
    assert spec.dataloader_factory is load_cifar10
    assert spec.dataloader_defaults == {"batch_size": 128, "data_root": "./data", "num_workers": 4,
                                        "mock": False, "generator": None}
    assert spec.task_config == TaskConfig.for_cifar10()
    assert spec.loss_reward_config == LossRewardConfig.for_cifar10()
    assert spec.action_enum is build_action_enum("cnn")

    model = spec.create_model("cpu")
    assert isinstance(model, MorphogeneticModel) and isinstance(model.host, CNNHost)
    assert (model.host.n_blocks, model.host.base_channels, model.host.classifier.out_features) == (3, 8, 10)
    assert model.slot_id == "block2_post" and model.seed_slot.channels == 16
    assert model.task_config is spec.task_config and model.seed_slot.task_config is spec.task_config
    assert model.seed_slot.fast_mode is False
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.fixture(scope="module")
def tinystories_model():
    return get_task_spec("tinystories").create_model("cpu")


def test_tinystories_preset(tinystories_model):
    spec = get_task_spec("TinyStories")  # case-insensitive
    assert (spec.name, spec.topology, spec.task_type) == ("tinystories", "transformer", "lm")
    assert (spec.vocab_size, spec.block_size, spec.num_classes) == (50257, 256, None)
    assert spec.dataloader_factory is load_tinystories
    assert spec.dataloader_defaults == {"block_size": 256, "batch_size": 32, "max_train_samples": None,
                                        "max_val_samples": None, "num_workers": 0, "mock": False}
    assert spec.task_config == TaskConfig.for_tinystories()
    assert spec.loss_reward_config == LossRewardConfig.for_tinystories()
    assert spec.action_enum is build_action_enum("transformer")

    model = tinystories_model
    host = model.host
    assert isinstance(host, TransformerHost)
    assert (host.tok_emb.num_embeddings, host.n_embd, host.n_layer, host.block_size) == (50257, 384, 6, 256)
    assert host.layers[0].attn.n_head == 6 and host.drop.p == 0.1
    assert model.slot_id == "layer_0_post_block" and model.seed_slot.channels == 384
    assert model.seed_slot.task_config.topology == "transformer"
    d = 384
    assert sum(p.numel() for p in host.parameters()) == 50257 * d + 256 * d + 6 * (12 * d * d + 13 * d) + 2 * d


@pytest.mark.parametrize("name", ["cifar10", "CIFAR10", "Cifar10", "tinystories", "TINYSTORIES"])
def test_get_task_spec_is_case_insensitive(name):
    assert get_task_spec(name).name == name.lower()


@pytest.mark.parametrize("name", ["imagenet", "cifar-10", ""])
def test_get_task_spec_unknown(name):
    with pytest.raises(ValueError) as info:
        get_task_spec(name)
    assert str(info.value) == f"Unknown task '{name}'. Available: cifar10, tinystories"


def test_presets_are_fresh_objects():
    a, b = get_task_spec("cifar10"), get_task_spec("cifar10")
    assert a is not b and a.dataloader_defaults is not b.dataloader_defaults
    a.dataloader_defaults["batch_size"] = 1
    assert b.dataloader_defaults["batch_size"] == 128


# ============================================================================ data loaders


def test_loader_signatures():
    params = inspect.signature(load_cifar10).parameters
    assert [(n, p.default) for n, p in params.items()] == [
        ("batch_size", 128), ("generator", None), ("data_root", "./data"), ("num_workers", 4), ("mock", False)
    ]
    params = inspect.signature(load_tinystories).parameters
    assert [(n, p.default) for n, p in params.items()] == [
        ("block_size", 256), ("batch_size", 32), ("max_train_samples", None), ("max_val_samples", None),
        ("num_workers", 0), ("mock", False),
    ]
    params = inspect.signature(TinyStoriesDataset).parameters
    assert [(n, p.default) for n, p in params.items()] == [
        ("split", "train"), ("block_size", 256), ("max_samples", None), ("mock", False), ("vocab_size", 50257)
    ]
    assert utils.load_cifar10 is load_cifar10


def test_cifar10_mock_data_is_drawn_from_the_global_rng():
    torch.manual_seed(7)
    train, test = get_task_spec("cifar10").create_dataloaders(mock=True, batch_size=4)
    torch.manual_seed(7)
    expected = [torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)), torch.randn(8, 3, 32, 32),
                torch.randint(0, 10, (8,))]  # train images, train labels, test images, test labels
    actual = [*train.dataset.tensors, *test.dataset.tensors]
    assert all(torch.equal(a, e) for a, e in zip(actual, expected))
    assert expected[1].dtype == torch.int64 and int(expected[1].max()) < 10 and int(expected[1].min()) >= 0

    for loader in (train, test):
        assert isinstance(loader, DataLoader)
        assert (loader.batch_size, loader.num_workers, len(loader)) == (4, 0, 2)  # mock: no workers
    batches = list(test)  # not shuffled
    assert torch.equal(batches[0][0], expected[2][:4]) and torch.equal(batches[1][1], expected[3][4:])
    x, y = next(iter(train))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (4,)


def test_cifar10_mock_train_loader_shuffles():
    train, _ = load_cifar10(batch_size=16, mock=True)
    seen = torch.cat([y for _, y in train])
    assert not torch.equal(seen, train.dataset.tensors[1])  # shuffled (deterministic: conftest seeds torch)
    assert torch.equal(seen.sort().values, train.dataset.tensors[1].sort().values)


def test_tinystories_mock_windows_come_from_a_generator_seeded_with_zero():
    train, val = get_task_spec("tinystories").create_dataloaders(mock=True, block_size=8, batch_size=4)
    rng = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, 50257, (9,), generator=rng).tolist() for _ in range(16)]
    for loader in (train, val):
        assert isinstance(loader.dataset, TinyStoriesDataset)
        assert loader.dataset.examples == windows and len(loader.dataset) == 16
        assert (loader.batch_size, loader.num_workers, loader.pin_memory, len(loader)) == (4, 0, False, 4)
    x, y = val.dataset[3]
    assert x.dtype == torch.long and x.tolist() == windows[3][:-1] and y.tolist() == windows[3][1:]
    xb, yb = next(iter(val))  # not shuffled
    assert xb.shape == yb.shape == (4, 8) and torch.equal(xb[:, 1:], yb[:, :-1])
    assert xb[0].tolist() == windows[0][:-1]


def test_tinystories_mock_sample_counts_and_rng_isolation():
    rng_state = torch.get_rng_state()
    train, val = load_tinystories(block_size=4, batch_size=2, max_train_samples=3, max_val_samples=5, mock=True)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG is untouched
    assert (len(train.dataset), len(val.dataset)) == (3, 5)
    assert val.dataset.examples[:3] == train.dataset.examples
    small = TinyStoriesDataset(block_size=4, max_samples=2, mock=True, vocab_size=10)
    assert all(0 <= t < 10 for window in small.examples for t in window) and len(small.examples[0]) == 5


# ============================================================================ create_model


def test_create_model_on_cpu():
    model = create_model("cifar10", device="cpu")
    assert isinstance(model, MorphogeneticModel) and isinstance(model.host, CNNHost)
    assert next(model.parameters()).device.type == "cpu"
    assert isinstance(create_model(get_task_spec("cifar10"), "cpu").host, CNNHost)
    assert inspect.signature(create_model).parameters["task"].default == "cifar10"
    assert inspect.signature(create_model).parameters["device"].default == "cuda"


def test_create_model_unknown_task():
    with pytest.raises(ValueError, match="Unknown task 'mnist'"):
        create_model("mnist", device="cpu")


# ids avoid the bare word "cuda", which conftest reads as the CUDA marker
@pytest.mark.parametrize("device", ["cuda", "cuda:0"], ids=["default", "index0"])
def test_create_model_without_cuda_raises(device, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    built = []
    spec = get_task_spec("cifar10")
    monkeypatch.setattr(spec, "model_factory", lambda d: built.append(d))
    with pytest.raises(RuntimeError, match="CUDA.*not available"):
        create_model(spec, device=device)
    assert built == []
    with pytest.raises(RuntimeError, match="CUDA.*not available"):
        create_model(device=device)


def test_an_unknown_task_is_reported_before_a_missing_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="Unknown task"):
        create_model("mnist", device="cuda")


@pytest.mark.cuda
def test_create_model_on_cuda():
    model = create_model("cifar10", device="cuda")
    assert next(model.parameters()).is_cuda and model.seed_slot.device.type == "cuda"
    model.germinate_seed("conv_light", "s")
    assert next(model.seed_slot.seed.parameters()).is_cuda
