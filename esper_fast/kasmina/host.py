"""Host networks with named injection points, and the model that wires a seed slot into one.

A host exposes ``injection_points`` (slot id -> feature channels), ``register_slot`` and
``unregister_slot``; each injection point is an ``nn.Identity`` in ``host.slots`` until a
slot is registered there, so the forward pass is the same code with or without a seed.

Module structure, parameter names, construction order (hence initialisation for a torch
seed) and the forward's sequence of operations are the original's: the same seed gives the
same weights and the same numbers.
"""

from __future__ import annotations

import contextlib
from types import MappingProxyType
from typing import Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from esper_fast.kasmina.blueprints.cnn import ConvBlock
from esper_fast.kasmina.slot import SeedSlot
from esper_fast.leyline import is_active_stage

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
    "forced_alphas",
    "forward_each_configuration",
]


def _check_injection_point(slots: nn.ModuleDict, slot_id: str) -> None:
    if slot_id not in slots:
        raise ValueError(f"Unknown injection point: {slot_id}")


def _defining_class(cls: type, name: str) -> type | None:
    return next((klass for klass in cls.__mro__ if name in klass.__dict__), None)


def splits_at_slots(host: nn.Module, *, between: bool = False) -> bool:
    """True when ``host.forward_from_slot(host.forward_to_slot(x, s), s)`` is exactly
    ``host(x)``: the host has both halves, they are defined by the same class as its
    ``forward`` (a subclass that overrides ``forward`` alone gets False), and no hook would
    be skipped by calling the halves directly. A custom host opts in by defining
    ``forward_to_slot(x, slot_id)`` (the features entering the slot) and
    ``forward_from_slot(features, slot_id)`` (the rest of the forward) beside its forward;
    ``between=True`` also asks for ``forward_between(features, from_slot, to_slot)`` (the
    segment from one slot's output to the features entering a later slot), which splitting
    at several slots needs. A host that opts in promises that in eval mode its samples
    (rows of the batch dimension) do not interact, so configurations stacked along the
    batch give each configuration's own result.
    """
    cls = type(host)
    owner = _defining_class(cls, "forward")
    if owner is None or owner is nn.Module:
        return False
    if not (owner is _defining_class(cls, "forward_to_slot") is _defining_class(cls, "forward_from_slot")):
        return False
    if between and _defining_class(cls, "forward_between") is not owner:
        return False
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    return not (host._forward_hooks or host._forward_pre_hooks or getattr(host, "_compiled_call_impl", None))


def _slot_position(slots: nn.ModuleDict, slot_id: str | None, default: int) -> int:
    """Where ``slot_id`` sits in the host's slot order (``default`` for None)."""
    if slot_id is None:
        return default
    _check_injection_point(slots, slot_id)
    return list(slots).index(slot_id)


def _check_segment(slots: nn.ModuleDict, from_slot: str | None, to_slot: str | None) -> None:
    start = _slot_position(slots, from_slot, -1)
    stop = _slot_position(slots, to_slot, len(slots))
    if start >= stop:
        raise ValueError(f"forward_between: slot {to_slot!r} does not come after slot {from_slot!r}")


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

    def forward_between(self, features: torch.Tensor, from_slot: str | None, to_slot: str | None) -> torch.Tensor:
        """One segment of the forward: from the output of slot ``from_slot`` (None: the input
        images) to the features entering slot ``to_slot`` (None: the logits). The slots in
        between apply as registered; the operations are the forward's, in its order."""
        _check_segment(self.slots, from_slot, to_slot)
        if from_slot is None:
            x, first = self._prepare(features), 0
        else:
            x, first = features, self._slot_indices[self._slot_keys.index(from_slot)] + 1
        x = self._blocks_from(first, x, stop_before=to_slot)
        return x if to_slot is not None else self._head(x)

    def forward_to_slot(self, x: torch.Tensor, slot_id: str) -> torch.Tensor:
        """The features that enter slot ``slot_id`` (slots before it applied)."""
        _check_injection_point(self.slots, slot_id)
        return self.forward_between(x, None, slot_id)

    def forward_from_slot(self, features: torch.Tensor, slot_id: str) -> torch.Tensor:
        """The rest of the forward from the output of slot ``slot_id``: the logits."""
        _check_injection_point(self.slots, slot_id)
        return self.forward_between(features, slot_id, None)


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

    def forward_between(self, features: torch.Tensor, from_slot: str | None, to_slot: str | None) -> torch.Tensor:
        """One segment of the forward: from the output of slot ``from_slot`` (None: the token
        ids) to the features entering slot ``to_slot`` (None: the logits). The slots in
        between apply as registered; the operations are the forward's, in its order."""
        _check_segment(self.slots, from_slot, to_slot)
        if from_slot is None:
            h, first = self._embed(features), 0
        else:
            h, first = features, self._slot_keys.index(from_slot) + 1
        h = self._layers_from(first, h, stop_before=to_slot)
        return h if to_slot is not None else self._head(h)

    def forward_to_slot(self, x: torch.Tensor, slot_id: str) -> torch.Tensor:
        """The features that enter slot ``slot_id`` (slots before it applied)."""
        _check_injection_point(self.slots, slot_id)
        return self.forward_between(x, None, slot_id)

    def forward_from_slot(self, features: torch.Tensor, slot_id: str) -> torch.Tensor:
        """The rest of the forward from the output of slot ``slot_id``: the logits."""
        _check_injection_point(self.slots, slot_id)
        return self.forward_between(features, slot_id, None)


@contextlib.contextmanager
def forced_alphas(slots: Mapping[str, nn.Module], configuration: Mapping):
    """Within the block, each slot that ``configuration`` names (slot id -> alpha; None: as
    it is) runs at that alpha (``slots[slot_id].force_alpha``); every alpha comes back on
    exit, even on error."""
    with contextlib.ExitStack() as forced:
        for slot_id, alpha in configuration.items():
            if alpha is not None:
                forced.enter_context(slots[slot_id].force_alpha(alpha))
        yield


def forward_each_configuration(model: nn.Module, x: torch.Tensor, slots: Mapping[str, nn.Module],
                               configurations) -> list[torch.Tensor]:
    """One ordinary forward of ``model`` per configuration, inside its slots' ``force_alpha``
    (:func:`forced_alphas`): what the shared walk must equal, and its fallback."""
    outputs = []
    for configuration in configurations:
        with forced_alphas(slots, configuration):
            outputs.append(model(x))
    return outputs


def _mixes_rows(module: nn.Module) -> bool:
    """True when ``module``'s output for one sample can depend on the other samples of the
    batch: any module in training mode (batch statistics, random masks), and a BatchNorm
    that normalises with batch statistics in eval too (``track_running_stats=False``)."""
    if module.training:
        return True
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is None


def _allow_missing_slot_states(model: "MorphogeneticModel", incompatible_keys) -> None:
    # A state dict saved before a slot was added has no lifecycle state for it: the slot
    # keeps what it has. Its seed's weights are still required when it holds one.
    for slot_id in model.seed_slots:
        if slot_id != model.slot_id:
            key = f"host.slots.{slot_id}._extra_state"
            if key in incompatible_keys.missing_keys:
                incompatible_keys.missing_keys.remove(key)


class MorphogeneticModel(nn.Module):
    """A host with :class:`SeedSlot` s registered at its injection points. ``forward`` is the
    host's forward.

    ``slot_id`` (default: the first of ``slots`` in host order, else the host's first
    injection point) is the main slot, ``model.seed_slot``; it is also inside the host at
    ``host.slots[slot_id]``, so its seed appears under both prefixes in ``state_dict``.
    ``slots`` (keyword-only) names every injection point that gets a slot, ``slot_id``
    among them (default: ``slot_id`` alone, the original's model); :meth:`add_slot` adds one
    later. The other slots live in the host only (``host.slots.<id>``): a model built
    without ``slots`` has exactly the original's ``state_dict``.

    The single-slot API speaks of the main slot: ``germinate_seed``, ``cull_seed`` and
    ``get_seed_parameters`` unless given ``slot=``, and the properties ``has_active_seed``,
    ``seed_state`` and ``active_seed_params``. :attr:`seed_slots` (every slot, in host
    order), :meth:`slot` and :attr:`live_slots` reach the others.
    """

    def __init__(
        self,
        host: nn.Module,
        device: str = "cpu",
        slot_id: str | None = None,
        task_config=None,
        fast_mode: bool = False,
        *,
        slots=None,
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
        slot_ids = self._check_slot_ids(slots, injection_points)
        self.slot_id = slot_id or (slot_ids[0] if slot_ids else next(iter(injection_points)))
        if self.slot_id not in injection_points:
            raise ValueError(
                f"Slot '{self.slot_id}' not found in host injection points: {list(injection_points.keys())}"
            )
        if slot_ids and self.slot_id not in slot_ids:
            raise ValueError(f"slot_id '{self.slot_id}' must be one of slots {slot_ids}")
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
        for extra in slot_ids:
            if extra != self.slot_id:
                self.add_slot(extra)
        self.register_load_state_dict_post_hook(_allow_missing_slot_states)

    @staticmethod
    def _check_slot_ids(slots, injection_points) -> list[str]:
        """``slots`` as a list in host order ([] for None); ValueError for an unknown, repeated
        or empty choice."""
        if slots is None:
            return []
        if isinstance(slots, str):
            slots = [slots]
        requested = list(slots)
        if not requested:
            raise ValueError("slots must name at least one injection point")
        unknown = [s for s in requested if s not in injection_points]
        if unknown:
            raise ValueError(f"Slots {unknown} not found in host injection points: {list(injection_points)}")
        if len(set(requested)) != len(requested):
            raise ValueError(f"slots names an injection point twice: {requested}")
        return [s for s in injection_points if s in requested]

    def _apply(self, fn, recurse: bool = True):
        # .to()/.cuda()/.half() move the seeds with the module tree; the slots must also place
        # future seeds (and their shape probes) where the model now lives.
        result = super()._apply(fn, recurse)
        first = next(self.parameters(), None)
        if first is not None:
            for slot in self.seed_slots.values():
                slot.device = first.device
            self._device = str(first.device)
        return result

    # ---------------------------------------------------------------- slots

    @property
    def seed_slots(self) -> Mapping[str, SeedSlot]:
        """Every seed slot of the model, slot id -> :class:`SeedSlot`, in the host's order
        (a read-only view, made on each access from ``host.slots``)."""
        found = {}
        host_slots = getattr(self.host, "slots", None)
        if isinstance(host_slots, nn.ModuleDict):
            found = {key: module for key, module in host_slots.items() if isinstance(module, SeedSlot)}
        if self.slot_id not in found:  # a custom host that keeps its slots elsewhere
            found = {self.slot_id: self.seed_slot, **found}
        return MappingProxyType(found)

    def slot(self, slot_id: str | None = None) -> SeedSlot:
        """The slot at ``slot_id`` (None: the main slot, ``seed_slot``)."""
        if slot_id is None:
            return self.seed_slot
        slots = self.seed_slots
        if slot_id not in slots:
            raise ValueError(f"No seed slot at '{slot_id}'; the model's slots: {list(slots)}")
        return slots[slot_id]

    def add_slot(self, slot_id: str) -> SeedSlot:
        """Register an empty :class:`SeedSlot` at injection point ``slot_id`` (made like the
        main slot: same device, task_config and fast_mode) and return it. It lives in the host
        only, under ``host.slots.<slot_id>``."""
        injection_points = self.host.injection_points
        if slot_id not in injection_points:
            raise ValueError(f"Slot '{slot_id}' not found in host injection points: {list(injection_points)}")
        if slot_id in self.seed_slots:
            raise ValueError(f"Injection point '{slot_id}' already holds a seed slot")
        slot = SeedSlot(
            slot_id=slot_id,
            channels=injection_points[slot_id],
            device=self.seed_slot.device,
            task_config=self.task_config,
            fast_mode=self.seed_slot.fast_mode,
        )
        self.host.register_slot(slot_id, slot)
        return slot

    @property
    def live_slots(self) -> tuple[str, ...]:
        """The ids of the slots whose seed is live (:attr:`SeedSlot.is_live`), in host order."""
        return tuple(slot_id for slot_id, slot in self.seed_slots.items() if slot.is_live)

    # ---------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.host(x)

    def forward_configurations(self, x: torch.Tensor, configurations) -> list[torch.Tensor]:
        """The model's output under each configuration of its slots, as if ``self(x)`` ran
        once per configuration with those slots' alphas forced (eval, no grad).

        A configuration maps slot ids to the alpha their slot is forced to: a float (0.0
        switches the seed off) or a per-sample tensor ``[B]``; a slot it does not name (or
        names with None) runs as it is.

        Where the walk is exactly the forward (no hook or compiled wrapper on the model, a
        slot or the host; a host that splits, see :func:`splits_at_slots`; no module that
        mixes the samples of a batch: eval mode, BatchNorm with running statistics) this is
        one walk over the host: each segment between slots runs once on every distinct
        configuration of the slots above it, stacked along the batch; each seed runs once
        per distinct input; a slot whose seed cannot change its output (no seed, or the
        straight-through estimator at alpha 0) does not split; configurations that coincide
        share one output tensor. The outputs are then views of one stacked tensor.
        Otherwise: one ordinary forward per configuration. See docs/SLOTS.md.
        """
        slots, configurations = self._checked_configurations(configurations)
        split = self._split_points(slots, configurations)
        if not self._runs_tree(len(split)):
            return forward_each_configuration(self, x, slots, configurations)
        stacked, groups, batch = self._forward_tree(x, slots, configurations, split)
        rows = [stacked[g * batch : (g + 1) * batch] for g in range(max(groups) + 1)]
        return [rows[g] for g in groups]

    def forward_configurations_stacked(self, x: torch.Tensor, configurations) -> tuple[torch.Tensor, list[int]]:
        """:meth:`forward_configurations` as ``(outputs, groups)``: the distinct outputs
        stacked along the batch (``[G * B, ...]``) and, per configuration, the index of its
        output. Without the shared walk, the per-configuration outputs concatenated."""
        slots, configurations = self._checked_configurations(configurations)
        split = self._split_points(slots, configurations)
        if not self._runs_tree(len(split)):
            outputs = forward_each_configuration(self, x, slots, configurations)
            return torch.cat(outputs), list(range(len(outputs)))
        stacked, groups, _ = self._forward_tree(x, slots, configurations, split)
        return stacked, groups

    def forward_alpha_configs(self, x: torch.Tensor, alphas) -> list[torch.Tensor]:
        """The model's output for each alpha in ``alphas`` (a float, or a per-sample tensor
        ``[B]``), as if ``self(x)`` ran inside ``seed_slot.force_alpha(alpha)`` each time:
        :meth:`forward_configurations` of the main slot. With a host that splits at its
        slots, the host up to the slot runs once, the seed once, and the rest of the host
        once on every distinct configuration stacked along the batch."""
        return self.forward_configurations(x, [{self.slot_id: alpha} for alpha in alphas])

    def _checked_configurations(self, configurations) -> tuple[Mapping[str, SeedSlot], list[dict]]:
        slots = self.seed_slots
        configurations = [dict(configuration) for configuration in configurations]
        if not configurations:
            raise ValueError("forward_configurations: give at least one configuration")
        for configuration in configurations:
            unknown = [slot_id for slot_id in configuration if slot_id not in slots]
            if unknown:
                raise ValueError(f"forward_configurations: no seed slot at {unknown}; the model's slots: {list(slots)}")
        return slots, configurations

    @staticmethod
    def _split_points(slots: Mapping[str, SeedSlot], configurations: list[dict]) -> list[str]:
        """The slots the walk stops at, in host order: those some configuration sets to a
        different output than the current one, and a straight-through slot (whose forward
        would run its seed for an unchanged value)."""
        split = []
        for slot_id, slot in slots.items():
            as_is = slot.configuration_key(None)
            varies = any(slot.configuration_key(c.get(slot_id)) != as_is for c in configurations)
            idle_seed = as_is == "host" and slot.is_active and is_active_stage(slot.state.stage)
            if varies or idle_seed:
                split.append(slot_id)
        return split

    def _runs_tree(self, split_count: int) -> bool:
        return self._splits(split_count) and not any(_mixes_rows(m) for m in self.modules())

    def _splits(self, split_count: int = 1) -> bool:
        """True when the host can be walked in segments between ``split_count`` slots with
        exactly the ordinary forward's operations: no hook or compiled wrapper on the model
        or a slot, ``forward`` not overridden by a subclass, and a host that splits (see
        :func:`splits_at_slots`; two or more split points need ``forward_between``)."""
        if self._forward_hooks or self._forward_pre_hooks or getattr(self, "_compiled_call_impl", None):
            return False
        if _defining_class(type(self), "forward") is not MorphogeneticModel:
            return False
        if not splits_at_slots(self.host, between=split_count > 1):
            return False
        return not any(
            slot._forward_hooks or slot._forward_pre_hooks or getattr(slot, "_compiled_call_impl", None)
            for slot in self.seed_slots.values()
        )

    def _forward_tree(self, x: torch.Tensor, slots, configurations: list[dict], split: list[str]):
        """The shared walk: ``(outputs [G * B, ...], group of each configuration, B)``."""
        batch = x.shape[0]
        if not split:
            return self.host(x), [0] * len(configurations), batch
        h, groups, num_groups, previous = x, [0] * len(configurations), 1, None
        for slot_id in split:
            slot = slots[slot_id]
            h = self._segment(h, previous, slot_id)
            index: dict = {}
            requests: list = []
            keys: list = []
            for k, configuration in enumerate(configurations):
                alpha = configuration.get(slot_id)
                key = slot.configuration_key(alpha)
                if (groups[k], key) not in index:
                    index[(groups[k], key)] = len(requests)
                    requests.append((groups[k], alpha))
                    keys.append(key)
                groups[k] = index[(groups[k], key)]
            unchanged = all(key == "host" for key in keys) and [g for g, _ in requests] == list(range(num_groups))
            if not unchanged:
                outputs = slot.forward_groups(h, num_groups, requests)
                h = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
            num_groups, previous = len(requests), slot_id
        return self._segment(h, previous, None), groups, batch

    def _segment(self, h: torch.Tensor, from_slot: str | None, to_slot: str | None) -> torch.Tensor:
        if from_slot is None:
            return self.host.forward_to_slot(h, to_slot)
        if to_slot is None:
            return self.host.forward_from_slot(h, from_slot)
        return self.host.forward_between(h, from_slot, to_slot)

    # ---------------------------------------------------------------- the single-slot API

    def germinate_seed(self, blueprint_id: str, seed_id: str, *, slot: str | None = None) -> None:
        """Germinate ``blueprint_id`` in the slot at ``slot`` (default: the main slot), watched
        by the isolation monitor."""
        self.slot(slot).germinate(blueprint_id=blueprint_id, seed_id=seed_id, host_module=self.host)

    def cull_seed(self, *, slot: str | None = None) -> None:
        """Cull the seed of the slot at ``slot`` (default: the main slot)."""
        self.slot(slot).cull()

    def get_seed_parameters(self, *, slot: str | None = None) -> Iterator[nn.Parameter]:
        """The seed parameters of the slot at ``slot`` (default: the main slot)."""
        return self.slot(slot).get_parameters()

    def get_host_parameters(self) -> Iterator[nn.Parameter]:
        """The host backbone's parameters: everything outside ``host.slots``."""
        for name, param in self.host.named_parameters():
            if "slots" not in name:
                yield param

    @property
    def has_active_seed(self) -> bool:
        """Whether the main slot holds a seed (see :attr:`seed_slots` for the others)."""
        return self.seed_slot.is_active

    @property
    def seed_state(self):
        """The main slot's seed state."""
        return self.seed_slot.state

    @property
    def active_seed_params(self) -> int:
        """Trainable parameters of the main slot's seed."""
        return self.seed_slot.active_seed_params
