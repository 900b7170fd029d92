"""A blueprint the run's device cannot train is found at start-up, in one line."""

import pytest
import torch
import torch.nn as nn

from esper_fast.kasmina.blueprints import BlueprintRegistry, training_failure
from cli_helpers import run_cli


class _NoBackwardOnCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("this seed has no backward on CPU. More words that stay out of the message.")


class _ForwardOnlySeed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(dim))

    def forward(self, x):
        return _NoBackwardOnCPU.apply(x * self.scale.view(1, -1, 1, 1))


@pytest.fixture
def forward_only_blueprint():
    BlueprintRegistry.register("forward_only", "cnn", param_estimate=1)(_ForwardOnlySeed)
    yield "forward_only"
    BlueprintRegistry.unregister("cnn", "forward_only")


def test_a_seed_without_backward_is_reported_in_one_line(forward_only_blueprint):
    failure = training_failure("cnn", forward_only_blueprint, "cpu")
    assert failure == "NotImplementedError: this seed has no backward on CPU"


@pytest.mark.parametrize("topology", ["cnn", "transformer"])
def test_the_built_in_blueprints_train_on_cpu(topology):
    trainable = [name for name in BlueprintRegistry.names(topology) if training_failure(topology, name, "cpu") is None]
    expected = [name for name in BlueprintRegistry.names(topology) if name != "flex_attention"]
    assert trainable == expected


def test_the_probe_leaves_the_random_state_as_it_was(forward_only_blueprint):
    before = torch.get_rng_state()
    training_failure("cnn", "conv_light", "cpu")
    training_failure("cnn", forward_only_blueprint, "cpu")
    assert torch.equal(torch.get_rng_state(), before)


def test_train_refuses_the_blueprint_at_start_up(capsys, tmp_path, forward_only_blueprint):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--blueprint", forward_only_blueprint, "--device", "cpu",
                           "--epochs", "2", "--out", out)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0] == ("esper-fast: error: --blueprint forward_only cannot train on cpu (NotImplementedError: "
                        "this seed has no backward on CPU); choose another blueprint or device")
    assert not out.exists()


@pytest.mark.skipif("flex_attention" not in BlueprintRegistry.names("transformer"), reason="torch without FlexAttention")
def test_flex_attention_is_refused_on_cpu(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--task", "tinystories", "--blueprint", "flex_attention",
                           "--device", "cpu", "--out", tmp_path / "run")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--blueprint flex_attention cannot train on cpu" in err and "backward on CPU" in err
