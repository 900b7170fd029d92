"""Host networks with named injection points, and the model that wires a seed slot into one.

A host exposes ``injection_points`` (slot id -> feature channels), ``register_slot`` and
``unregister_slot``; each injection point is an ``nn.Identity`` in ``host.slots`` until a
slot is registered there, so the forward pass is the same code with or without a seed.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from esper_fast.kasmina.blueprints.cnn import ConvBlock
from esper_fast.kasmina.slot import SeedSlot


class _SlottedHost(nn.Module):
    """Injection-point bookkeeping shared by the hosts: ``self.slots`` keyed by ``self._slot_keys``."""

    topology: str

    @property
    def injection_points(self) -> dict[str, int]:
        raise NotImplementedError

    def register_slot(self, slot_id: str, slot: nn.Module) -> None:
        """Attach ``slot`` at ``slot_id`` (moved to the host's device)."""
        if slot_id not in self.slots:
            raise ValueError(f"unknown injection point {slot_id!r}; choose one of {list(self._slot_keys)}")
        device = next(self.parameters()).device
        self.slots[slot_id] = slot.to(device)

    def unregister_slot(self, slot_id: str) -> None:
        if slot_id not in self.slots:
            raise ValueError(f"unknown injection point {slot_id!r}; choose one of {list(self._slot_keys)}")
        self.slots[slot_id] = nn.Identity()


class CNNHost(_SlottedHost):
    """conv-BN-ReLU blocks with doubling channels, a 2x2 max-pool after each, an injection
    point after every block but the first (``block2_post``, ``block3_post``, ...), global
    average pooling and a linear classifier.

    Input ``[N, 3, H, W]`` is converted to ``memory_format`` (channels_last by default, which
    the parameters use too; None keeps the input's layout). Output ``[N, num_classes]``.
    """

    topology = "cnn"

    def __init__(
        self,
        num_classes: int = 10,
        n_blocks: int = 3,
        base_channels: int = 32,
        memory_format: torch.memory_format | None = torch.channels_last,
    ):
        super().__init__()
        if n_blocks < 2:
            raise ValueError(f"CNNHost needs n_blocks >= 2 to have an injection point, got {n_blocks}")
        self.num_classes = num_classes
        self.n_blocks = n_blocks
        self.base_channels = base_channels
        self.memory_format = memory_format

        widths = [base_channels * 2**i for i in range(n_blocks)]
        self.blocks = nn.ModuleList(ConvBlock(c_in, c_out) for c_in, c_out in zip([3] + widths[:-1], widths))
        self.pool = nn.MaxPool2d(2, 2)
        self._slot_keys = tuple(f"block{i + 1}_post" for i in range(1, n_blocks))
        self._slot_after_block = {i: f"block{i + 1}_post" for i in range(1, n_blocks)}
        self._channels = {f"block{i + 1}_post": widths[i] for i in range(1, n_blocks)}
        self.slots = nn.ModuleDict({key: nn.Identity() for key in self._slot_keys})
        self.classifier = nn.Linear(widths[-1], num_classes)
        if memory_format is not None:
            self.to(memory_format=memory_format)

    @property
    def injection_points(self) -> dict[str, int]:
        return dict(self._channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.memory_format is not None:
            x = x.contiguous(memory_format=self.memory_format)
        for i, block in enumerate(self.blocks):
            x = self.pool(block(x))
            key = self._slot_after_block.get(i)
            if key is not None:
                x = self.slots[key](x)
        x = x.mean(dim=(2, 3))
        return self.classifier(x)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention on ``F.scaled_dot_product_attention``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.n_head = n_head
        self.dropout = dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).view(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(b, t, c)))


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

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def _init_gpt_weights(module: nn.Module) -> None:
    # GPT-2 initialisation: with PyTorch's N(0, 1) embedding init the tied head starts with a
    # loss of about 220 nats instead of ln(vocab_size).
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class TransformerHost(_SlottedHost):
    """Pre-norm GPT decoder with tied token embedding / output head and an injection point
    after each layer (``layer_{i}_post_block``). Input token ids ``[B, T]`` with
    ``T <= block_size``; output logits ``[B, T, vocab_size]``."""

    topology = "transformer"

    def __init__(
        self,
        vocab_size: int = 50257,
        n_embd: int = 384,
        n_head: int = 6,
        n_layer: int = 6,
        block_size: int = 256,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.block_size = block_size

        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(TransformerBlock(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # weight tying: one matrix embeds and decodes

        self._slot_keys = tuple(f"layer_{i}_post_block" for i in range(n_layer))
        self.slots = nn.ModuleDict({key: nn.Identity() for key in self._slot_keys})
        self.apply(_init_gpt_weights)

    @property
    def injection_points(self) -> dict[str, int]:
        return {key: self.n_embd for key in self._slot_keys}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.block_size}")
        pos = torch.arange(t, device=x.device)
        h = self.drop(self.tok_emb(x) + self.pos_emb(pos))
        for key, layer in zip(self._slot_keys, self.layers):
            h = self.slots[key](layer(h))
        return self.head(self.ln_f(h))


class MorphogeneticModel(nn.Module):
    """A host with one :class:`SeedSlot` registered at injection point ``slot_id`` (default:
    the host's first). ``forward`` is the host's forward.

    The slot is reachable as ``model.seed_slot`` and inside the host at
    ``host.slots[slot_id]``, as in the original (so its seed appears under both prefixes in
    ``state_dict``).
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
        injection_points = getattr(host, "injection_points", None)
        if not injection_points:
            raise ValueError("the host must expose a non-empty injection_points mapping (slot id -> channels)")
        if not hasattr(host, "register_slot"):
            raise ValueError("the host must implement register_slot(slot_id, module)")
        slot_id = slot_id or next(iter(injection_points))
        if slot_id not in injection_points:
            raise ValueError(f"unknown injection point {slot_id!r}; choose one of {list(injection_points)}")

        self.task_config = task_config
        self.slot_id = slot_id
        self.host = host.to(device)
        self.seed_slot = SeedSlot(
            slot_id=slot_id,
            channels=injection_points[slot_id],
            device=device,
            task_config=task_config,
            fast_mode=fast_mode,
        )
        self.seed_slot.default_topology = getattr(host, "topology", "cnn")
        self.host.register_slot(slot_id, self.seed_slot)

    def _apply(self, fn, recurse: bool = True):
        # .to()/.cuda()/.half() move the seed with the module tree; the slot must also
        # place future seeds where the host now lives.
        result = super()._apply(fn, recurse)
        first = next(self.host.parameters(), None)
        if first is not None:
            self.seed_slot.device = first.device
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.host(x)

    def germinate_seed(self, blueprint_id: str, seed_id: str) -> None:
        self.seed_slot.germinate(blueprint_id=blueprint_id, seed_id=seed_id, host_module=self.host)

    def cull_seed(self) -> None:
        self.seed_slot.cull()

    def get_seed_parameters(self) -> Iterator[nn.Parameter]:
        return self.seed_slot.get_parameters()

    def get_host_parameters(self) -> Iterator[nn.Parameter]:
        """The host's own parameters, without any seed's."""
        seed_ids = {id(p) for p in self.seed_slot.parameters()}
        return (p for p in self.host.parameters() if id(p) not in seed_ids)

    @property
    def has_active_seed(self) -> bool:
        return self.seed_slot.is_active

    @property
    def seed_state(self):
        return self.seed_slot.state

    @property
    def active_seed_params(self) -> int:
        return self.seed_slot.active_seed_params


__all__ = [
    "CNNHost",
    "TransformerHost",
    "MorphogeneticModel",
    "CausalSelfAttention",
    "MLP",
    "TransformerBlock",
    "ConvBlock",
]
