"""The hosts, networks with named injection points, and the model that grows seeds in them.

A host exposes ``injection_points`` (slot id -> feature channels), ``register_slot`` and
``unregister_slot`` (:class:`~esper_fast.kasmina.protocol.HostProtocol`); each injection point
is an ``nn.Identity`` in ``host.slots`` until a slot is registered there, so the forward pass
is the same code with or without a seed. Both hosts keep the segment contract
(:class:`~esper_fast.kasmina.protocol.SegmentedHost`) through
:class:`~esper_fast.kasmina.segments.SlotSegments`: each defines the one segment
``forward_between`` its forward is made of. The topology facts (slot ids) are read from
:mod:`esper_fast.kasmina.topologies`.

:class:`MorphogeneticModel` holds a :class:`SeedSlot` at one or several injection points;
its configurations (forced alphas, the shared walk) are :mod:`esper_fast.kasmina.configurations`.

Module structure, parameter names, construction order (hence initialisation for a torch
seed) and the forward's sequence of operations are the original's: the same seed gives the
same weights and the same numbers.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from esper_fast.kasmina import configurations as _configurations
from esper_fast.kasmina.blueprints.cnn import ConvBlock
from esper_fast.kasmina.configurations import forced_alphas, forward_each_configuration
from esper_fast.kasmina.segments import SlotSegments, splits_at_slots
from esper_fast.kasmina.slot import SeedSlot
from esper_fast.kasmina.topologies import slots_in_host_order, topology
from esper_fast.kasmina.transformer_layers import MLP, CausalSelfAttention, TransformerBlock, init_gpt_weights

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


class CNNHost(SlotSegments, nn.Module):
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
        cnn = topology("cnn")
        self._slot_indices = tuple(range(cnn.first_slot_block, n_blocks))  # a slot follows each of these blocks
        self._slot_keys = cnn.slot_ids(n_blocks)
        self.slots = nn.ModuleDict({key: nn.Identity() for key in self._slot_keys})
        self.classifier = nn.Linear(widths[-1], num_classes)

    @property
    def injection_points(self) -> dict[str, int]:
        return {key: self.blocks[i].conv.out_channels for key, i in zip(self._slot_keys, self._slot_indices)}

    # The forward in pieces: input layout, blocks with their slots, classifier head;
    # forward_between puts them together.
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
        self._check_segment(from_slot, to_slot)
        if from_slot is None:
            x, first = self._prepare(features), 0
        else:
            x, first = features, self._slot_indices[self._slot_keys.index(from_slot)] + 1
        x = self._blocks_from(first, x, stop_before=to_slot)
        return x if to_slot is not None else self._head(x)


_HOST_INITS = ("default", "gpt")


class TransformerHost(SlotSegments, nn.Module):
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

        self._slot_keys = topology("transformer").slot_ids(n_layer)
        self.slots = nn.ModuleDict({key: nn.Identity() for key in self._slot_keys})
        if init == "gpt":
            init_gpt_weights(self)

    @property
    def injection_points(self) -> dict[str, int]:
        return {key: self.n_embd for key in self._slot_keys}

    # The forward in pieces: embeddings, layers with their slots, output head;
    # forward_between puts them together.
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
        self._check_segment(from_slot, to_slot)
        if from_slot is None:
            h, first = self._embed(features), 0
        else:
            h, first = features, self._slot_keys.index(from_slot) + 1
        h = self._layers_from(first, h, stop_before=to_slot)
        return h if to_slot is not None else self._head(h)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or getattr(module, "_compiled_call_impl", None))


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
        slot_ids = slots_in_host_order(slots, injection_points)
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
        """The model's output under each configuration of its slots (slot id -> forced alpha,
        see :mod:`esper_fast.kasmina.configurations`), as if ``self(x)`` ran once per
        configuration with those alphas forced (eval, no grad).

        Where the walk is exactly the forward (see :meth:`_runs_tree`) this is one walk over
        the host (:func:`~esper_fast.kasmina.configurations.forward_tree`): each segment runs
        once on every distinct configuration of the slots above it, stacked along the batch,
        and the outputs are views of one stacked tensor (configurations that coincide share
        one). Otherwise: one ordinary forward per configuration. See docs/SLOTS.md.
        """
        slots, configurations, split = self._walk_plan(configurations)
        if not self._runs_tree(len(split)):
            return forward_each_configuration(self, x, slots, configurations)
        stacked, groups, batch = _configurations.forward_tree(self.host, x, slots, configurations, split)
        rows = [stacked[g * batch : (g + 1) * batch] for g in range(max(groups) + 1)]
        return [rows[g] for g in groups]

    def forward_configurations_stacked(self, x: torch.Tensor, configurations) -> tuple[torch.Tensor, list[int]]:
        """:meth:`forward_configurations` as ``(outputs, groups)``: the distinct outputs
        stacked along the batch (``[G * B, ...]``) and, per configuration, the index of its
        output. Without the shared walk, the per-configuration outputs concatenated."""
        slots, configurations, split = self._walk_plan(configurations)
        if not self._runs_tree(len(split)):
            outputs = forward_each_configuration(self, x, slots, configurations)
            return torch.cat(outputs), list(range(len(outputs)))
        stacked, groups, _ = _configurations.forward_tree(self.host, x, slots, configurations, split)
        return stacked, groups

    def forward_alpha_configs(self, x: torch.Tensor, alphas) -> list[torch.Tensor]:
        """The model's output for each alpha in ``alphas`` (a float, or a per-sample tensor
        ``[B]``), as if ``self(x)`` ran inside ``seed_slot.force_alpha(alpha)`` each time:
        :meth:`forward_configurations` of the main slot."""
        return self.forward_configurations(x, [{self.slot_id: alpha} for alpha in alphas])

    def _walk_plan(self, configurations) -> tuple[Mapping[str, SeedSlot], list[dict], list[str]]:
        """The slots, the configurations checked (ValueError for an unknown slot) and the
        slots the walk stops at."""
        slots = self.seed_slots
        configurations = [dict(configuration) for configuration in configurations]
        if not configurations:
            raise ValueError("forward_configurations: give at least one configuration")
        for configuration in configurations:
            unknown = [slot_id for slot_id in configuration if slot_id not in slots]
            if unknown:
                raise ValueError(f"forward_configurations: no seed slot at {unknown}; the model's slots: {list(slots)}")
        return slots, configurations, _configurations.split_points(slots, configurations)

    def _runs_tree(self, split_count: int) -> bool:
        """The walk is exact: :meth:`_splits`, and no module mixes the rows of a batch (eval
        mode, BatchNorm with running statistics)."""
        return self._splits(split_count) and not any(_configurations.mixes_rows(m) for m in self.modules())

    def _splits(self, split_count: int = 1) -> bool:
        """True when the host can be walked in segments between ``split_count`` slots with
        exactly the ordinary forward's operations: no hook or compiled wrapper on the model
        or a slot, ``forward`` not overridden by a subclass, and a host that keeps the
        segment contract (:func:`splits_at_slots`; two or more stops need ``forward_between``)."""
        if type(self).forward is not MorphogeneticModel.forward or _hooked(self):
            return False
        if not splits_at_slots(self.host, between=split_count > 1):
            return False
        return not any(_hooked(slot) for slot in self.seed_slots.values())

    # ---------------------------------------------------------------- the single-slot API

    def germinate_seed(self, blueprint_id: str, seed_id: str, *, slot: str | None = None) -> None:
        """Germinate ``blueprint_id`` in the slot at ``slot`` (default: the main slot), watched
        by the isolation monitor."""
        self.slot(slot).germinate(blueprint_id=blueprint_id, seed_id=seed_id, host_module=self.host)

    def germinate_candidates(self, blueprint_ids, seed_ids=None, *, slot: str | None = None) -> None:
        """Germinate several blueprints to incubate together in the slot at ``slot`` (default:
        the main slot), the first watched by the isolation monitor
        (:meth:`SeedSlot.germinate_candidates`)."""
        self.slot(slot).germinate_candidates(blueprint_ids, seed_ids, host_module=self.host)

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
