"""Task presets, their dataloaders, and create_model."""

import pytest
import torch
from torch.utils.data import TensorDataset

import esper_fast
from esper_fast.kasmina import CNNHost, MorphogeneticModel, TransformerHost
from esper_fast.runtime import TaskSpec, get_task_spec
from esper_fast.tolaria import create_model
from esper_fast.tolaria.environment import create_model as create_model_direct

CUDA = torch.cuda.is_available()


def test_cifar10_spec():
    spec = get_task_spec("cifar10")
    assert isinstance(spec, TaskSpec)
    assert (spec.name, spec.topology, spec.task_type, spec.num_classes) == ("cifar10", "cnn", "classification", 10)
    assert spec.vocab_size is None and spec.block_size is None
    model = spec.create_model("cpu")
    assert isinstance(model, MorphogeneticModel) and isinstance(model.host, CNNHost)
    assert model.host.base_channels == 8 and model.host.num_classes == 10
    assert model.seed_slot.topology == "cnn"
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_tinystories_spec():
    spec = get_task_spec("TinyStories")
    assert (spec.name, spec.topology, spec.task_type) == ("tinystories", "transformer", "lm")
    assert (spec.vocab_size, spec.block_size) == (50257, 256)
    model = spec.create_model("cpu")
    host = model.host
    assert isinstance(host, TransformerHost)
    assert (host.vocab_size, host.n_embd, host.n_layer, host.block_size) == (50257, 384, 6, 256)
    assert host.layers[0].attn.n_head == 6 and host.drop.p == 0.1
    assert model.seed_slot.topology == "transformer" and model.slot_id == "layer_0_post_block"


def test_unknown_task_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown task 'imagenet'.*cifar10.*tinystories"):
        get_task_spec("imagenet")


def test_specs_are_independent():
    a, b = get_task_spec("cifar10"), get_task_spec("cifar10")
    a.dataloader_defaults["batch_size"] = 1
    assert b.dataloader_defaults["batch_size"] != 1


def test_cifar10_synthetic_loaders_are_deterministic():
    spec = get_task_spec("cifar10")
    train, test = spec.create_dataloaders(batch_size=16, num_train=40, num_test=20)
    x, y = next(iter(train))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and int(y.min()) >= 0 and int(y.max()) < 10
    assert len(train.dataset) == 40 and len(test.dataset) == 20 and len(test) == 2
    again, _ = spec.create_dataloaders(batch_size=16, num_train=40, num_test=20)
    x2, y2 = next(iter(again))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    other, _ = spec.create_dataloaders(batch_size=16, num_train=40, num_test=20, seed=1)
    assert not torch.equal(next(iter(other))[0], x)


def test_tinystories_synthetic_loaders_are_next_token_pairs():
    train, test = get_task_spec("tinystories").create_dataloaders(batch_size=4, num_train=8, num_test=4, block_size=12)
    x, y = next(iter(train))
    assert x.shape == y.shape == (4, 12) and x.dtype == torch.int64
    assert int(x.max()) < 256  # byte tokens fit any vocabulary here
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert len(test.dataset) == 4


def test_cifar10_default_data_is_the_learnable_generated_set():
    train, _ = get_task_spec("cifar10").create_dataloaders(batch_size=20, num_train=40, num_test=20, shuffle=False)
    x, y = next(iter(train))
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32
    labels = torch.cat([batch_labels for _, batch_labels in train])
    assert torch.equal(labels.bincount(minlength=10), torch.full((10,), 4))  # balanced classes


def test_loaders_over_a_caller_dataset():
    trainset = TensorDataset(torch.randn(10, 3, 8, 8), torch.arange(10) % 10)
    testset = TensorDataset(torch.randn(6, 3, 8, 8), torch.zeros(6, dtype=torch.int64))
    train, test = get_task_spec("cifar10").create_dataloaders(dataset=(trainset, testset), batch_size=4, shuffle=False)
    assert train.dataset is trainset and test.dataset is testset
    x, y = next(iter(train))
    assert torch.equal(x, trainset.tensors[0][:4])


def test_unknown_dataloader_option_is_rejected():
    with pytest.raises(ValueError, match=r"unknown dataloader option\(s\) \['download'\].*batch_size"):
        get_task_spec("cifar10").create_dataloaders(download=True)


def test_create_model_on_cpu():
    model = create_model("cifar10", device="cpu")
    assert isinstance(model, MorphogeneticModel)
    assert next(model.parameters()).device.type == "cpu"
    spec = get_task_spec("cifar10")
    assert isinstance(create_model(spec, "cpu").host, CNNHost)
    assert esper_fast.create_model is create_model is create_model_direct


def test_create_model_unknown_task():
    with pytest.raises(ValueError, match="unknown task"):
        create_model("mnist", device="cpu")


@pytest.mark.skipif(CUDA, reason="checks the error raised when CUDA is missing")
# ids avoid the bare word "cuda", which conftest reads as the CUDA marker
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"], ids=["default", "index0", "index1"])
def test_create_model_without_cuda_raises_before_building(device, monkeypatch):
    built = []
    spec = get_task_spec("cifar10")
    monkeypatch.setattr(spec, "model_factory", lambda d: built.append(d))
    with pytest.raises(RuntimeError, match="CUDA.*not available"):
        create_model(spec, device=device)
    assert built == []
    with pytest.raises(RuntimeError, match="CUDA.*not available"):
        create_model(device=device)


@pytest.mark.cuda
def test_create_model_on_cuda():
    model = create_model("cifar10", device="cuda")
    assert next(model.parameters()).is_cuda and model.seed_slot.device.type == "cuda"
    model.germinate_seed("conv_light", "s")
    assert next(model.seed_slot.seed.parameters()).is_cuda
    with pytest.raises(RuntimeError, match="only .* CUDA device"):
        create_model("cifar10", device=f"cuda:{torch.cuda.device_count()}")
