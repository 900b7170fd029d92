"""The ranks of a data-parallel run: the ``torchrun`` processes that train one model in lockstep.

Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``
in the environment, ``WORLD_SIZE`` > 1) :meth:`Ranks.from_env` joins the job's process group;
otherwise, and for a world of one, :class:`Ranks` is a single process and every method below
is the identity, so a one-process run computes exactly what it computed before.

Two groups. The default group is gloo, on the CPU: it carries what every rank must agree on
without touching the device (the start-up broadcast from rank 0, the per-step stop flag, the
per-epoch state checksums, the validation metrics). The data group carries the model's
tensors: the same gloo group for a CPU run, an NCCL group for a CUDA run (each rank on
``cuda:LOCAL_RANK``): DistributedDataParallel's gradient averaging and the per-epoch
all-reduce of the step losses.

What each rank does the same way, from the same numbers, is the loop's business
(:mod:`esper_fast.train.loop`); this module only moves the numbers.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

# The variables torchrun sets for each worker.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_world_size() -> int:
    """``WORLD_SIZE`` as torchrun set it (1 outside torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def launched_rank() -> int:
    """``RANK`` as torchrun set it (0 outside torchrun)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class RanksDivergedError(RuntimeError):
    """The ranks' models (or random generators) differ after an epoch: lockstep is broken."""


class Ranks:
    """This process's place in the run. ``rank`` 0 is the writer: it alone holds the run
    folder's lock and writes the log, plot and checkpoints."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, owns_group: bool = False):
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.owns_group = owns_group
        self.data_group = None      # set by use_device: gloo (the default group) or NCCL
        self.backend: str | None = None

    @classmethod
    def from_env(cls) -> "Ranks":
        """The ranks torchrun started (a single process outside torchrun or for a world of one).
        Joins the default process group (gloo, ``env://``) unless one is initialised already."""
        import torch.distributed as dist

        world = launched_world_size()
        if world == 1 and not (dist.is_available() and dist.is_initialized()):
            return cls()
        if not dist.is_available():
            raise RuntimeError("this torch build has no torch.distributed; a run of several processes needs it")
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("gloo", init_method="env://")
        if dist.get_world_size() == 1:
            if owns:
                dist.destroy_process_group()
            return cls()
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return cls(dist.get_rank(), dist.get_world_size(), local, owns_group=owns)

    # ---------------------------------------------------------------- where
    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def device_for(self, device: str) -> str:
        """The device this rank computes on: ``cuda`` (or any ``cuda:N``) becomes
        ``cuda:LOCAL_RANK`` in a run of several processes; one process keeps ``device``."""
        if self.distributed and device.startswith("cuda"):
            return f"cuda:{self.local_rank}"
        return device

    def use_device(self, device: str) -> None:
        """Sets up the data group for ``device`` (from :meth:`device_for`); every rank calls it,
        in the same order relative to its other collectives."""
        if not self.distributed:
            return
        import torch.distributed as dist

        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
            self.data_group = dist.new_group(backend="nccl")
            self.backend = "nccl"
        else:
            self.data_group = dist.group.WORLD
            self.backend = "gloo"

    def close(self, clean: bool = True) -> None:
        """Leaves the process group if :meth:`from_env` joined it. ``clean``: every rank gets
        here (a barrier first, so that no rank exits while another is still in a collective)."""
        if not (self.distributed and self.owns_group):
            return
        import torch.distributed as dist

        if dist.is_initialized():
            if clean:
                dist.barrier()
            dist.destroy_process_group()

    # ---------------------------------------------------------------- agreeing
    def max(self, value: int) -> int:
        """The largest of the ranks' ``value`` on every rank (one all-reduce of one int on the CPU)."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        found = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
        return int(found[0])

    def agree_to_stop(self, stop, requested: bool) -> bool:
        """Whether to stop now (``stop``: the process's StopSignals, ``requested``: whether it
        asks to). Over several processes the ranks agree, the largest signal number asked of
        any rank (one all-reduce), so that they all stop after the same step; a rank that was
        not signalled itself adopts the stop."""
        if not self.distributed:
            return requested
        signum = self.max(stop.signum or 0)
        if signum:
            stop.adopt(signum)
        return bool(signum)

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (pickled; the CPU group)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_writer else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank (pickled; the CPU group)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        found = [None] * self.world_size
        dist.all_gather_object(found, obj)
        return found

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over the ranks of ``values`` (same shape on every rank), on the data group
        and ``values``' device; a NaN on any rank makes that entry NaN everywhere."""
        if not self.distributed:
            return values
        import torch.distributed as dist

        total = values.clone()
        dist.all_reduce(total, group=self.data_group)
        return total / self.world_size

    def epoch_losses(self, watch) -> list[float]:
        """Every step's loss of the epoch (``watch``: the run's LossWatch), read from the device
        once; over several processes the mean over the ranks (one all-reduce), so that every
        rank's governor sees the same losses."""
        if not self.distributed:
            return watch.epoch_losses()
        return self.mean(watch.losses[: watch.step]).tolist()

    def average_norm_statistics(self, model: nn.Module) -> None:
        """Averages the BatchNorm running statistics over the ranks (one all-reduce).

        Each rank updates them from its own batches during an epoch (DDP does not broadcast
        buffers per step here, see :meth:`wrap`); training uses batch statistics, so only
        evaluation reads them. Every other buffer is the same on every rank by construction.
        """
        if not self.distributed:
            return
        import torch.distributed as dist

        stats = norm_statistics(model)
        if not stats:
            return
        flat = torch.cat([s.detach().reshape(-1).to(torch.float64) for s in stats])
        dist.all_reduce(flat, group=self.data_group)
        flat /= self.world_size
        offset = 0
        for s in stats:
            s.copy_(flat[offset: offset + s.numel()].view_as(s))
            offset += s.numel()

    # ---------------------------------------------------------------- DDP
    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` inside a new DistributedDataParallel (``model`` itself for one process).

        Built again by the loop whenever the set of trained parameters or the slot's stage
        changes (germinate, advance, cull, rollback): the constructor broadcasts rank 0's
        parameters and buffers, and ``static_graph=True`` lets DDP find, in the first step, the
        parameters that stage leaves out of the backward (a germinated seed, a detached host
        prefix) without a graph traversal per step. Buffers are not broadcast per step
        (``forward_sync_buffers=False``); see :meth:`average_norm_statistics`.
        """
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        cuda = next(model.parameters()).device.type == "cuda"
        return DistributedDataParallel(
            model,
            device_ids=[self.local_rank] if cuda else None,
            process_group=self.data_group,
            static_graph=True,
            forward_sync_buffers=False,
        )


def state_checksum(model: nn.Module, device: str) -> str:
    """A cheap fingerprint of the model's tensors and torch's random generators: per tensor
    the wrapped int64 sum of its bit patterns, weighted by its position in the state dict.
    Any single changed bit changes it. 16 hex digits; one host read."""
    tensors = [value for value in model.state_dict().values() if isinstance(value, torch.Tensor)]
    generators = [torch.get_rng_state()]
    if device.startswith("cuda"):
        generators.append(torch.cuda.get_rng_state(torch.device(device)))
    on_device = torch.stack([_bits(t).sum(dtype=torch.int64).to(device) for t in tensors]).cpu()
    values = on_device.tolist() + [int(_bits(g).sum(dtype=torch.int64)) for g in generators]
    total = 0
    for index, value in enumerate(values):
        total = (total + (2 * index + 1) * value) % 2**64
    return f"{total:016x}"


_INTEGER_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        return flat.to(torch.uint8)
    return flat.view(_INTEGER_OF_WIDTH[flat.element_size()])


def norm_statistics(model: nn.Module) -> list[torch.Tensor]:
    """The BatchNorm running statistics of ``model``: the one state a rank keeps of its own
    during an epoch (see :meth:`Ranks.average_norm_statistics`)."""
    return [buf for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
            for buf in (m.running_mean, m.running_var) if buf is not None]
