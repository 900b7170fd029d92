"""Host networks with named injection points, and the model that wires a seed slot into one.

A host exposes ``injection_points`` (slot id -> feature channels), ``register_slot`` and
``unregister_slot``; each injection point is an ``nn.Identity`` in ``host.slots`` until a
slot is registered there, so the forward pass is the same code with or without a seed.

Module structure, parameter names, construction order (hence initialisation for a torch
seed) and the forward's sequence of operations are the original's: the same seed gives the
same weights and the same numbers.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from esper_fast.kasmina.blueprints.cnn import ConvBlock
from esper_fast.kasmina.slot import SeedSlot

__all__ = [
    "ConvBlock",
    "CNNHost",
    "CausalSelfAttention",
    "MLP",
    "TransformerBlock",
    "TransformerHost",
    "MorphogeneticModel",
    "init_gpt_weights",
    "splits_at_slots",
]


def _check_injection_point(slots: nn.ModuleDict, slot_id: str) -> None:
    if slot_id not in slots:
        raise ValueError(f"Unknown injection point: {slot_id}")


def _defining_class(cls: type, name: str) -> type | None:
    return next((klass for klass in cls.__mro__ if name in klass.__dict__), None)


def splits_at_slots(host: nn.Module) -> bool:
    """True when ``host.forward_from_slot(host.forward_to_slot(x, s), s)`` is exactly
    ``host(x)``: the host has both halves, they are defined by the same class as its
    ``forward`` (a subclass that overrides ``forward`` alone gets False), and no hook would
    be skipped by calling the halves directly. A custom host opts in by defining
    ``forward_to_slot(x, slot_id)`` (the features entering the slot) and
    ``forward_from_slot(features, slot_id)`` (the rest of the forward) beside its forward.
    """
    cls = type(host)
    owner = _defining_class(cls, "forward")
    if owner is None or owner is nn.Module:
        return False
    if not (owner is _defining_class(cls, "forward_to_slot") is _defining_class(cls, "forward_from_slot")):
        return False
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    return not (host._forward_hooks or host._forward_pre_hooks or getattr(host, "_compiled_call_impl", None))


class CNNHost(nn.Module):
    """conv-BN-ReLU blocks with doubling channels, a 2x2 max-pool after each, an injection
    point after every block but the first (``block2_post``, ``block3_post``, ...), global
    average pooling and a linear classifier.

    The input is converted to channels_last once when ``memory_format`` is
    ``torch.channels_last`` (the default; conv, BN and pooling keep it); any other value
    leaves the input's layout alone. Output ``[N, num_classes]``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        n_blocks: int = 3,
        base_channels: int = 32,
        memory_format: torch.memory_format = torch.channels_last,
    ):
        super().__init__()
        if n_blocks < 2:
            raise ValueError("CNNHost requires at least 2 blocks to expose an injection point")
        self.n_blocks = n_blocks
        self.base_channels = base_channels
        self._memory_format = memory_format

        widths = [base_channels * 2**i for i in range(n_blocks)]
        self.blocks = nn.ModuleList(ConvBlock(c_in, c_out) for c_in, c_out in zip([3] + widths[:-1], widths))
        self.pool = nn.MaxPool2d(2, 2)
        self._slot_indices = tuple(range(1, n_blocks))  # a slot follows each of these blocks
        self._slot_keys = tuple(f"block{i + 1}_post" for i in self._slot_indices)
        self.slots = nn.ModuleDict({key: nn.Identity() for key in self._slot_keys})
        self.classifier = nn.Linear(widths[-1], num_classes)

    @property
    def injection_points(self) -> dict[str, int]:
        return {key: self.blocks[i].conv.out_channels for key, i in zip(self._slot_keys, self._slot_indices)}

    def register_slot(self, slot_id: str, slot: nn.Module) -> None:
        """Attach ``slot`` at ``slot_id`` (moved to the host's device)."""
        _check_injection_point(self.slots, slot_id)
        self.slots[slot_id] = slot.to(next(self.parameters()).device)

    def unregister_slot(self, slot_id: str) -> None:
        _check_injection_point(self.slots, slot_id)
        self.slots[slot_id] = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._head(self._blocks_from(0, self._prepare(x)))

    # The forward in pieces: input layout, blocks with their slots, classifier head. The
    # slot split below runs the same operations in the same order.
    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self._memory_format == torch.channels_last:
            x = x.to(memory_format=torch.channels_last)
        return x

    def _blocks_from(self, first: int, x: torch.Tensor, stop_before: str | None = None) -> torch.Tensor:
        """Blocks ``first..`` and the slots after them; returns the features entering slot
        ``stop_before`` when it is reached."""
        for i in range(first, len(self.blocks)):
            x = self.pool(self.blocks[i](x))
            if i in self._slot_indices:
                key = self._slot_keys[self._slot_indices.index(i)]
                if key == stop_before:
                    return x
                x = self.slots[key](x)
        return x

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def forward_to_slot(self, x: torch.Tensor, slot_id: str) -> torch.Tensor:
        """The features that enter slot ``slot_id`` (slots before it applied)."""
        _check_injection_point(self.slots, slot_id)
        return self._blocks_from(0, self._prepare(x), stop_before=slot_id)

    def forward_from_slot(self, features: torch.Tensor, slot_id: str) -> torch.Tensor:
        """The rest of the forward from the output of slot ``slot_id``: the logits."""
        _check_injection_point(self.slots, slot_id)
        after = self._slot_indices[self._slot_keys.index(slot_id)]
        return self._head(self._blocks_from(after + 1, features))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention on ``F.scaled_dot_product_attention``."""

    def __init__(self, n_embd: int, n_head: int, block_size: int, dropout: float):
        super().__init__()
        assert n_embd % n_head == 0, f"n_embd ({n_embd}) must be divisible by n_head ({n_head})"
        self.n_head = n_head
        self.n_embd = n_embd
        self.head_dim = n_embd // n_head
        self.dropout_p = dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.resid_dropout = nn.Dropout(dropout)  # attention dropout is SDPA's dropout_p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (z.view(b, t, self.n_head, self.head_dim).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout_p if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: Linear(4x) -> GELU -> Linear -> Dropout."""

    def __init__(self, n_embd: int, dropout: float):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, n_embd: int, n_head: int, block_size: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size, dropout)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def init_gpt_weights(module: nn.Module) -> nn.Module:
    """GPT-2 initialisation of every Linear and Embedding in ``module``: N(0, 0.02) weights,
    zero biases. PyTorch's N(0, 1) embedding init makes the tied head start near 220 nats of
    loss instead of ln(vocab_size). Returns ``module``."""

    def init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    return module.apply(init)


_HOST_INITS = ("default", "gpt")


class TransformerHost(nn.Module):
    """Pre-norm GPT decoder with tied token embedding / output head and an injection point
    after each layer (``layer_{i}_post_block``). Input token ids ``[B, T]``, ``T <= block_size``;
    output logits ``[B, T, vocab_size]``.

    ``init="default"`` keeps PyTorch's initialisation (the original's); ``"gpt"`` applies
    :func:`init_gpt_weights` afterwards.
    """

    def __init__(
        self,
        vocab_size: int = 50257,
        n_embd: int = 384,
        n_head: int = 6,
        n_layer: int = 6,
        block_size: int = 256,
        dropout: float = 0.1,
        *,
        init: str = "default",
    ):
        super().__init__()
        if init not in _HOST_INITS:
            raise ValueError(f"TransformerHost: init must be one of {_HOST_INITS}, got {init!r}")
        self.n_layer = n_layer
        self.n_embd = n_embd
        self.block_size = block_size

        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList([TransformerBlock(n_embd, n_head, block_size, dropout) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # weight tying: one matrix embeds and decodes

        self._slot_keys = tuple(f"layer_{i}_post_block" for i in range(n_layer))
        self.slots = nn.ModuleDict({key: nn.Identity() for key in self._slot_keys})
        if init == "gpt":
            init_gpt_weights(self)

    @property
    def injection_points(self) -> dict[str, int]:
        return {key: self.n_embd for key in self._slot_keys}

    def register_slot(self, slot_id: str, slot: nn.Module) -> None:
        """Attach ``slot`` at ``slot_id`` (moved to the embedding's device)."""
        _check_injection_point(self.slots, slot_id)
        self.slots[slot_id] = slot.to(self.tok_emb.weight.device)

    def unregister_slot(self, slot_id: str) -> None:
        _check_injection_point(self.slots, slot_id)
        self.slots[slot_id] = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._head(self._layers_from(0, self._embed(x)))

    # The forward in pieces: embeddings, layers with their slots, output head. The slot
    # split below runs the same operations in the same order.
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        _, t = x.shape
        if t > self.block_size:
            raise ValueError(f"Sequence length {t} exceeds block_size {self.block_size}")
        pos = torch.arange(t, device=x.device)
        return self.drop(self.tok_emb(x) + self.pos_emb(pos))

    def _layers_from(self, first: int, h: torch.Tensor, stop_before: str | None = None) -> torch.Tensor:
        """Layers ``first..`` and the slot after each; returns the features entering slot
        ``stop_before`` when it is reached."""
        for i in range(first, len(self.layers)):
            h = self.layers[i](h)
            key = self._slot_keys[i]
            if key == stop_before:
                return h
            h = self.slots[key](h)
        return h

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_f(h))

    def forward_to_slot(self, x: torch.Tensor, slot_id: str) -> torch.Tensor:
        """The features that enter slot ``slot_id`` (slots before it applied)."""
        _check_injection_point(self.slots, slot_id)
        return self._layers_from(0, self._embed(x), stop_before=slot_id)

    def forward_from_slot(self, features: torch.Tensor, slot_id: str) -> torch.Tensor:
        """The rest of the forward from the output of slot ``slot_id``: the logits."""
        _check_injection_point(self.slots, slot_id)
        return self._head(self._layers_from(self._slot_keys.index(slot_id) + 1, features))


class MorphogeneticModel(nn.Module):
    """A host with one :class:`SeedSlot` registered at injection point ``slot_id`` (default:
    the host's first). ``forward`` is the host's forward.

    The slot is reachable as ``model.seed_slot`` and inside the host at
    ``host.slots[slot_id]``, so its seed appears under both prefixes in ``state_dict``.
    """

    def __init__(
        self,
        host: nn.Module,
        device: str = "cpu",
        slot_id: str | None = None,
        task_config=None,
        fast_mode: bool = False,
    ):
        super().__init__()
        self.host = host
        self._device = device
        self.task_config = task_config
        try:
            injection_points = host.injection_points
        except AttributeError as exc:
            raise ValueError("Host must expose injection_points mapping for seed slots") from exc
        if not injection_points:
            raise ValueError("Host injection_points mapping must not be empty")
        self.slot_id = slot_id or next(iter(injection_points))
        if self.slot_id not in injection_points:
            raise ValueError(
                f"Slot '{self.slot_id}' not found in host injection points: {list(injection_points.keys())}"
            )
        self.seed_slot = SeedSlot(
            slot_id=self.slot_id,
            channels=injection_points[self.slot_id],
            device=device,
            task_config=task_config,
            fast_mode=fast_mode,
        )
        try:
            register_slot = self.host.register_slot
        except AttributeError as exc:
            raise ValueError("Host must implement register_slot(slot_id, module)") from exc
        # The host moves first: register_slot places the slot on the host's device.
        self.host = self.host.to(device)
        register_slot(self.slot_id, self.seed_slot)

    def _apply(self, fn, recurse: bool = True):
        # .to()/.cuda()/.half() move the seed with the module tree; the slot must also place
        # future seeds (and its shape probes) where the model now lives.
        result = super()._apply(fn, recurse)
        first = next(self.parameters(), None)
        if first is not None:
            self.seed_slot.device = first.device
            self._device = str(first.device)
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.host(x)

    def forward_alpha_configs(self, x: torch.Tensor, alphas) -> list[torch.Tensor]:
        """The model's output for each alpha in ``alphas`` (a float, or a per-sample tensor
        ``[B]``), as if ``self(x)`` ran inside ``seed_slot.force_alpha(alpha)`` each time.

        When the host splits at its slots (:func:`splits_at_slots`) it is one pass: the host
        up to the slot runs once, the seed once, and the rest of the host once on every
        distinct configuration stacked along the batch; configurations the slot makes
        identical (no live seed, or the straight-through estimator at alpha 0) share one
        output tensor. Otherwise, one ordinary forward per alpha. For eval without grad:
        stacking rows is exact only where samples do not interact (BatchNorm in eval).
        """
        if not self._splits():
            outputs = []
            for alpha in alphas:
                with self.seed_slot.force_alpha(alpha):
                    outputs.append(self(x))
            return outputs
        host_features = self.host.forward_to_slot(x, self.slot_id)
        features, groups = self.seed_slot.forward_alpha_configs(host_features, alphas)
        rows = self.host.forward_from_slot(features, self.slot_id).split(host_features.shape[0])
        return [rows[g] for g in groups]

    def _splits(self) -> bool:
        # The one-pass form is used only where it is exactly the ordinary forward.
        if self._forward_hooks or self._forward_pre_hooks or getattr(self, "_compiled_call_impl", None):
            return False
        if _defining_class(type(self), "forward") is not MorphogeneticModel:
            return False
        slot = self.seed_slot
        return splits_at_slots(self.host) and not (slot._forward_hooks or slot._forward_pre_hooks)

    def germinate_seed(self, blueprint_id: str, seed_id: str) -> None:
        """Germinate ``blueprint_id`` in the slot, watched by the isolation monitor."""
        self.seed_slot.germinate(blueprint_id=blueprint_id, seed_id=seed_id, host_module=self.host)

    def cull_seed(self) -> None:
        self.seed_slot.cull()

    def get_seed_parameters(self) -> Iterator[nn.Parameter]:
        return self.seed_slot.get_parameters()

    def get_host_parameters(self) -> Iterator[nn.Parameter]:
        """The host backbone's parameters: everything outside ``host.slots``."""
        for name, param in self.host.named_parameters():
            if "slots" not in name:
                yield param

    @property
    def has_active_seed(self) -> bool:
        return self.seed_slot.is_active

    @property
    def seed_state(self):
        return self.seed_slot.state

    @property
    def active_seed_params(self) -> int:
        return self.seed_slot.active_seed_params
