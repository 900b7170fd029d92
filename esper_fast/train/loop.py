"""Where a run trains: the epoch loop of ``esper-fast train``.

A host with one seed slot is trained while the seed is germinated, incubated, blended,
judged by counterfactual attribution and fossilized or culled (the decisions are
:mod:`esper_fast.train.controller`'s), under the governor. Each epoch runs the trainer
function for the slot's stage, feeds every step's loss to the governor (a panic rolls the
model back to the last healthy epoch's snapshot, culling a live seed), validates, lets the
controller decide and snapshots. Everything the run writes goes through its
:class:`~esper_fast.train.run_dir.RunDir`: after each epoch the checkpoint, then the
epoch's log record.

Checkpoints and resume. A checkpoint is written when the run starts (epoch 0), after every
epoch (a rolled-back epoch included: its model is the restored healthy one) and when a stop
is requested in the middle of an epoch; it holds the position (epochs done, steps done of
the next), the model, optimizers, controller, governor, every random generator and the log
so far. A run resumed from it continues exactly where it was: a mid-epoch checkpoint also
holds the steps' losses, the batch-order generator as the epoch began (the same batches are
drawn again and the done ones skipped), torch's generator as the stop came (set once the
skipped batches are drawn), and the governor's snapshot tensors (the model has moved on
from them). On CPU a resumed run ends with the same records, bit for bit, as one that was
never stopped.

Several processes (``torchrun``, see :mod:`esper_fast.train.ranks`). Every rank runs this
loop on its shard of the data and trains through a DistributedDataParallel wrapper, built
again whenever the slot's parameters or stage change. Every decision is taken on every rank
from the same numbers: the step losses the governor reads are averaged over the ranks once
per epoch (a NaN on one rank is a NaN on all), validation returns the metrics over every
rank's batches, and the controller then decides the same thing everywhere. A stop request is
agreed before each step (one all-reduce of one int on the CPU), so all ranks stop after the
same step. After each epoch the ranks compare a checksum of their model and random
generators; rank 0 logs them and alone writes the folder.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import platform
import socket
import time

import torch
import torch.nn as nn

from esper_fast.leyline import SeedStage
from esper_fast.train import checkpoint
from esper_fast.train.config import RunConfig
from esper_fast.train.console import say
from esper_fast.train.controller import LifecycleSchedule, SeedController
from esper_fast.train.ranks import Ranks, RanksDivergedError, norm_statistics, state_checksum
from esper_fast.train.report import epoch_line, outcome, summary_lines
from esper_fast.train.run_dir import METRICS_FILE, PLOT_FILE, STOPPED_BY, RunDir, RunDirError, now_iso
from esper_fast.train.signals import StopSignals
from esper_fast.train.watch import Batches, KernelTally, LossWatch, Progress


class ResumeError(RunDirError):
    """A checkpoint that this run cannot continue from; the message says why."""


def _make_optimizer(params, task_type: str, lr: float):
    params = [p for p in params if p.requires_grad]
    if task_type == "lm":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)


def _cosine_lr(base: float, epoch: int, epochs: int) -> float:
    """Cosine decay over the run (epoch is 1-based), so the last epochs settle."""
    return base * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / epochs))


def load_data(config: RunConfig, spec, ranks: Ranks | None = None):
    """The task's loaders (see :mod:`esper_fast.train.data`), this rank's shards; ``config`` is resolved."""
    from esper_fast.train import data

    pin = config.device.startswith("cuda")
    shard = {} if ranks is None or not ranks.distributed else {"rank": ranks.rank, "world_size": ranks.world_size}
    if spec.task_type == "lm":
        if spec.block_size and config.seq_len > spec.block_size:
            raise data.DataError(f"--seq-len {config.seq_len} exceeds the model's block size {spec.block_size}")
        return data.tinystories_loaders(
            text_path=config.text_path,
            seq_len=config.seq_len,
            batch_size=config.batch_size,
            seed=config.seed,
            pin_memory=pin,
            vocab_size=spec.vocab_size or data.BYTE_VOCAB_SIZE,
            **shard,
        )
    return data.cifar10_loaders(data_root=config.data_root, batch_size=config.batch_size, seed=config.seed,
                                pin_memory=pin, **shard)


def versions() -> dict:
    """The versions a result depends on."""
    import esper_fast

    found = {
        "esper_fast": esper_fast.__version__,
        "torch": str(torch.__version__),  # a str subclass that weights_only loading refuses
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    for name in ("torchvision", "numpy"):
        try:
            found[name] = str(__import__(name).__version__)
        except ImportError:
            found[name] = None
    return found


def device_description(device: str) -> str:
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return f"{device}: {props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads of {os.cpu_count()} cores"


class LifecycleRun:
    """One ``esper-fast train`` run: the model, its data, optimizers, governor and controller,
    the records so far, and the run folder they are written to. Begin it with :meth:`start`
    (a new run) or :meth:`resume_from` (a checkpoint), then :meth:`execute`.

    ``config`` must be resolved (:func:`esper_fast.train.config.resolve`). ``ranks``: this
    process's place in a run of several (default: a single process); ``run_dir`` is then a
    :class:`~esper_fast.train.run_dir.SilentRunDir` on every rank but 0.
    """

    def __init__(self, config: RunConfig, run_dir: RunDir, stop: StopSignals | None = None, echo=say,
                 ranks: Ranks | None = None):
        from esper_fast.kasmina.host import init_gpt_weights
        from esper_fast.ops.mode import using_reference
        from esper_fast.runtime import get_task_spec
        from esper_fast.tolaria import TolariaGovernor, create_model

        self.config, self.run_dir, self.echo = config, run_dir, echo
        self.stop = stop if stop is not None else StopSignals()
        self.ranks = ranks = ranks if ranks is not None else Ranks()
        if config.inject_nan_at is not None and not 0 <= config.inject_nan_rank < ranks.world_size:
            raise ValueError(f"inject_nan_rank {config.inject_nan_rank} is not a rank of a run of {ranks.world_size}")
        # Every rank computes on its own device (cuda:LOCAL_RANK); config.device is what was asked.
        self.device = device = ranks.device_for(config.device)
        ranks.use_device(device)
        self.spec = spec = get_task_spec(config.task)
        self.task_type = spec.task_type
        self.blueprint = config.blueprint
        self.num_classes = spec.num_classes or 10
        self.reference = using_reference()

        torch.manual_seed(config.seed)
        self.data = load_data(dataclasses.replace(config, device=device), spec, ranks)
        self.model = create_model(spec, device)
        if self.task_type == "lm":
            # GPT-2 initialisation: the tied head starts near ln(vocab) instead of ~220 nats.
            init_gpt_weights(self.model.host)
        if config.compile:
            self.model.seed_slot.compilable = True
            self.model.compile()
        self.criterion = nn.CrossEntropyLoss()
        self.watch = LossWatch(self.criterion, device)
        vocab = spec.vocab_size if self.task_type == "lm" and spec.vocab_size else self.num_classes
        # A rollback culls the live seed; the controller then expects an empty slot.
        self.governor = TolariaGovernor(self.model, random_guess_loss=math.log(vocab), clear_live_seed_state=True)
        self.host_optimizer = _make_optimizer(self.model.get_host_parameters(), self.task_type, config.lr)
        self.seed_optimizer = None
        # What the trainer steps: the model, or (several processes) its DDP wrapper, and the
        # slot's parameters and stage the wrapper was built for.
        self.trained: nn.Module = self.model
        self._wrapped_for: tuple | None = None

        self.train_batches = Batches(self.data.trainloader, config.max_batches)
        self.test_batches = Batches(self.data.testloader, config.max_batches)
        self.steps_per_epoch = len(self.train_batches)
        self.schedule = LifecycleSchedule.for_epochs(config.epochs)
        self.controller = SeedController(self.model, self.blueprint, self.schedule, config.epochs, self.steps_per_epoch)
        self.tally = KernelTally(enabled=not config.compile)
        self.records: list[dict] = []       # the epoch records
        self.log_records: list[dict] = []   # everything in metrics.jsonl, in order
        self.rollbacks = 0
        self.next_epoch = 1
        self.progress: dict | None = None   # a resumed epoch's state (see the module docstring)
        self._resume_rng: dict | None = None
        self.elapsed_before = 0.0           # training time of the earlier sessions of a resumed run
        self.checkpoint_path = None
        self._checkpoint_position: tuple[int, int] | None = None

    # ---------------------------------------------------------------- beginning
    def _config_record(self, command: str) -> dict:
        found = versions()
        return {
            "type": "config",
            "command": command,
            "started_at": now_iso(),
            "host": socket.gethostname(),
            **dataclasses.asdict(self.config),
            "task_type": self.task_type,
            "chance_accuracy": None if self.task_type == "lm" else 100.0 / self.num_classes,
            "data_source": self.data.source,
            "data": self.data.description,
            "data_fingerprint": self.data.fingerprint,
            "steps_per_epoch": self.steps_per_epoch,
            "schedule": dataclasses.asdict(self.schedule),
            "world_size": self.ranks.world_size,
            "backend": self.ranks.backend,
            "device_name": device_description(self.device),
            "versions": found,
            "esper_fast": found["esper_fast"],
            "torch": found["torch"],
            "python": found["python"],
            "reference_mode": self.reference,
        }

    def _announce(self) -> None:
        config = self.config
        self.echo(f"data: {self.data.description}")
        self.echo(
            f"train: {config.task} ({self.spec.topology} host, {self.task_type}) on {config.device}, {config.epochs} epochs x "
            f"{self.steps_per_epoch} steps, blueprint {self.blueprint}, seed {config.seed}"
            + (f", {self.ranks.world_size} processes (DDP over {self.ranks.backend}, "
               f"batch {config.batch_size} per process)" if self.ranks.distributed else "")
            + (", reference mode (original algorithms)" if self.reference else "")
        )

    def start(self, command: str) -> None:
        """A new run: the log's config record, ``run.json`` and the epoch-0 checkpoint."""
        self._announce()
        self.log_records = [self._config_record(command)]
        self.run_dir.start_log(self.log_records)
        self._write_running_status(command, epochs_done=0, steps_done=0, checkpoint=None)
        self._checkpoint(0)

    def _write_running_status(self, command: str, **position) -> None:
        """``run.json`` as this process takes the run on: the run itself (from the log's config
        record, the same for every session of the run) and where it stands."""
        self.run_dir.write_status(
            status="running", command=command, pid=os.getpid(), task=self.config.task, epochs=self.config.epochs,
            started_at=self.log_records[0]["started_at"], **position, stopped_by=None,
            world_size=self.ranks.world_size,
        )

    def resume_from(self, payload: dict, path, command: str, previous_status: dict | None = None) -> None:
        """Puts the run back where ``payload`` (a checkpoint) left it and rewrites the log to
        what the checkpoint had seen, followed by a ``resume`` record."""
        if payload.get("format") != checkpoint.FORMAT or payload.get("version") != checkpoint.VERSION:
            raise ResumeError(f"{path} is not a checkpoint of this version of esper-fast train")
        world = payload.get("world_size", 1)
        if world != self.ranks.world_size:
            raise ResumeError(f"the run had {world} process(es), this one has {self.ranks.world_size}; "
                              f"resume it with --nproc {world}")
        config_record = payload["log"][0]
        if config_record.get("data_fingerprint") != self.data.fingerprint:
            raise ResumeError(
                f"the text file {self.config.text_path} has changed since the run started; a resumed run must read the same data"
            )
        if config_record.get("steps_per_epoch") != self.steps_per_epoch:
            raise ResumeError(f"the data now gives {self.steps_per_epoch} steps per epoch, the run had "
                              f"{config_record.get('steps_per_epoch')}; a resumed run must read the same data")
        controller = self.controller
        controller.load_state_dict(payload["controller"])
        snapshot = payload["governor"]["snapshot"]

        def snapshot_first(extras):
            # The governor's Last Known Good state is older than the model (a mid-epoch
            # checkpoint): load it, snapshot it, then load the model itself.
            if snapshot is not None:
                self.model.load_state_dict({**snapshot, **extras}, strict=False)
                self.governor.snapshot()

        checkpoint.restore_model(self.model, payload["model"], germinated_before=bool(controller.seeds),
                                 before_load=snapshot_first)
        if snapshot is None:
            self.governor.snapshot()
        checkpoint.restore_governor(self.governor, payload["governor"])
        self.host_optimizer.load_state_dict(payload["optimizers"]["host"])
        if payload["optimizers"]["seed"] is not None:
            self.seed_optimizer = _make_optimizer(controller.seed_parameters(), self.task_type, self.config.lr)
            self.seed_optimizer.load_state_dict(payload["optimizers"]["seed"])

        self.log_records = list(payload["log"])
        self.records = [r for r in self.log_records if r.get("type") == "epoch"]
        self.rollbacks = payload["rollbacks"]
        self.tally.counts.update(payload["kernels"])
        self.elapsed_before = payload["elapsed_s"]
        position = payload["position"]
        self.next_epoch = position["epochs_done"] + 1
        self.progress = payload["progress"]
        self._resume_rng = payload["rng"]
        # Rank 0's generators on every rank: the ranks draw the same numbers (the per-epoch
        # checksum covers the generators too), so they all had these.
        checkpoint.restore_rng(payload["rng"], self.device, self.data.shuffle_generator,
                               torch_generators=self.progress is None)
        self.checkpoint_path = path
        self._checkpoint_position = (position["epochs_done"], position["steps_done"])

        self._announce()
        previous = previous_status or {}
        resume = {
            "type": "resume",
            "time": now_iso(),
            "command": command,
            "checkpoint": path.name,
            "epochs_done": position["epochs_done"],
            "steps_done": position["steps_done"],
            "stopped_by": previous.get("stopped_by") or STOPPED_BY.get(previous.get("status")),
            "stopped_at": previous.get("updated_at"),
        }
        self.log_records.append(resume)
        self.run_dir.start_log(self.log_records)
        self._write_running_status(command, epochs_done=position["epochs_done"], steps_done=position["steps_done"],
                                   checkpoint=str(path))
        where = f"epoch {self.next_epoch}" + (f", step {position['steps_done'] + 1}" if position["steps_done"] else "")
        self.echo(f"resume: from {path} at {where} of {self.config.epochs} epochs")

    # ---------------------------------------------------------------- checkpoints
    def _checkpoint(self, epochs_done: int, progress: dict | None = None) -> None:
        """Writes the run's state after ``epochs_done`` epochs (and ``progress`` of the next).
        Rank 0 alone; no collective here, so the ranks may take this call differently."""
        if not self.ranks.is_writer:
            return
        steps_done = progress["steps_done"] if progress else 0
        payload = {
            "format": checkpoint.FORMAT,
            "version": checkpoint.VERSION,
            "world_size": self.ranks.world_size,
            "config": dataclasses.asdict(self.config),
            "position": {"epochs_done": epochs_done, "steps_done": steps_done},
            "model": checkpoint.model_state(self.model),
            "optimizers": {
                "host": checkpoint.optimizer_state(self.host_optimizer),
                "seed": checkpoint.optimizer_state(self.seed_optimizer),
            },
            "controller": self.controller.state_dict(),
            "governor": checkpoint.governor_state(self.governor, with_snapshot=progress is not None),
            "rng": checkpoint.rng_state(self.device, self.data.shuffle_generator),
            "progress": progress,
            "log": self.log_records,
            "rollbacks": self.rollbacks,
            "kernels": dict(self.tally.counts),
            "elapsed_s": self.elapsed_before + self._session_time(),
        }
        path = self.run_dir.save_checkpoint(payload, epochs_done, steps_done)
        if path is not None:
            self.checkpoint_path = path
            self._checkpoint_position = (epochs_done, steps_done)
            self.run_dir.write_status(epochs_done=epochs_done, steps_done=steps_done, checkpoint=str(path))

    def _session_time(self) -> float:
        start = getattr(self, "_session_start", None)
        return 0.0 if start is None else time.perf_counter() - start

    # ---------------------------------------------------------------- the loop
    def execute(self) -> dict:
        """Runs the remaining epochs (or until a stop is requested); returns the summary,
        whose ``status`` is ``finished`` or ``interrupted``."""
        self._session_start = time.perf_counter()
        status = "finished"
        try:
            for epoch in range(self.next_epoch, self.config.epochs + 1):
                if self._stop_agreed(self.stop.requested):
                    status = "interrupted"
                    break
                record = self.run_epoch(epoch)
                if record is None:
                    status = "interrupted"
                    break
                self.records.append(record)
                self.log_records.append(record)
                self._check_ranks_agree(record)
                self._checkpoint(epoch)
                self.run_dir.append(record)
                self.echo(epoch_line(record, self.config.epochs, self.task_type))
        finally:
            self.tally.stop()
        return self.finish(status)

    def run_epoch(self, epoch: int) -> dict | None:
        """One epoch: train, governor check, validate, decide, snapshot. Returns its record,
        or None when a stop request ended it early (after writing a mid-epoch checkpoint)."""
        config, controller = self.config, self.controller
        progress, self.progress = self.progress, None
        start = time.perf_counter()
        stage = controller.stage
        stage_name = stage.name if stage is not None else "NONE"
        seed = controller.seeds[-1] if stage is not None else None
        poisoned = self.steps_per_epoch // 2 if config.inject_nan_at == epoch else None
        poison = poisoned if self.ranks.rank == config.inject_nan_rank else None
        lr = self._set_learning_rate(epoch, stage)
        self.data.set_epoch(epoch)
        shuffle = self.data.shuffle_generator

        if progress is None:
            started_at = now_iso()
            shuffle_at_start = shuffle.get_state() if shuffle is not None else None
            alpha_start = float(self.model.seed_slot.alpha)
            self.watch.begin_epoch(self.steps_per_epoch, poison)
            skip, after_skip, train_before = 0, None, 0.0
        else:
            started_at = progress["started_at"]
            shuffle_at_start = progress["shuffle_at_epoch_start"]
            if shuffle is not None:
                shuffle.set_state(shuffle_at_start)
            alpha_start = progress["alpha_start"]
            losses_done = progress["losses_by_rank"][self.ranks.rank] if self.ranks.distributed else progress["losses"]
            self.watch.resume_epoch(self.steps_per_epoch, poison, losses_done)
            skip, train_before = progress["steps_done"], progress["train_time_s"]
            rng = self._resume_rng

            def after_skip():
                checkpoint.restore_torch_rng(rng, config.device)

        self._wrap(stage)
        if progress is not None and self.ranks.distributed:
            # Mid-epoch each rank's BatchNorm statistics are its own (averaged at the epoch's
            # end); set after the wrapper, whose constructor broadcasts rank 0's buffers.
            for tensor, saved in zip(norm_statistics(self.model), progress["norm_statistics_by_rank"][self.ranks.rank]):
                tensor.copy_(saved)
        self._train(epoch, stage, stage_name, skip, after_skip)
        train_time = train_before + time.perf_counter() - start
        if self.watch.step < self.steps_per_epoch:
            self._stop_in_epoch(epoch, {
                "steps_done": self.watch.step,
                "losses": self.watch.done_losses(),
                "shuffle_at_epoch_start": shuffle_at_start,
                "alpha_start": alpha_start,
                "train_time_s": train_time,
                "started_at": started_at,
            })
            return None
        alpha = float(self.model.seed_slot.alpha)
        self.ranks.average_norm_statistics(self.model)
        losses = self._epoch_losses()

        where = f" on rank {config.inject_nan_rank}" if self.ranks.distributed else ""
        events = [f"NaN injected at step {poisoned + 1}{where}"] if poisoned is not None else []
        rollback = self._governor_check(epoch, losses, events)
        # The counterfactual only means something once the seed is in the forward (alpha > 0).
        measured = self._validate(attribution=controller.stage is not None and self.model.seed_slot.alpha > 0)
        attribution = measured.attribution
        contribution = None if attribution is None else float(attribution.seed_contribution)
        if not rollback:
            events += controller.end_epoch(epoch, measured.val_accuracy, contribution)
            if controller.stage is None:
                self.seed_optimizer = None
            with self.tally.tracing():
                self.governor.snapshot()
        epoch_time = train_before + time.perf_counter() - start

        record = {
            "type": "epoch",
            "epoch": epoch,
            "stage": stage_name,
            "stage_after": controller.stage.name if controller.stage is not None else "NONE",
            "seed_id": seed.seed_id if seed is not None else None,
            "blueprint": seed.blueprint if seed is not None else None,
            "alpha_start": alpha_start,
            "alpha": alpha,
            "lr": lr,
            "train_loss": (sum(losses) / len(losses)) if losses else None,
            "train_accuracy": measured.train_accuracy,
            "train_eval_loss": measured.train_loss,
            "val_loss": measured.val_loss,
            "val_accuracy": measured.val_accuracy,
            "perplexity": measured.perplexity,
            "per_class_accuracy": measured.per_class_acc,
            "seed_contribution": contribution,
            "real_accuracy": None if attribution is None else float(attribution.real_accuracy),
            "baseline_accuracy": None if attribution is None else float(attribution.baseline_accuracy),
            "rollback": rollback,
            "events": events,
            "steps": len(losses),
            "started_at": started_at,
            "ended_at": now_iso(),
            "train_time_s": train_time,
            "eval_time_s": epoch_time - train_time,
            "epoch_time_s": epoch_time,
            "samples_per_s": _samples_per_second(self.train_batches, len(losses) - skip, train_time - train_before,
                                                 self.ranks.world_size),
        }
        if self.ranks.distributed:
            record["ranks"] = self.ranks.gather({
                "rank": self.ranks.rank, "checksum": state_checksum(self.model, self.device),
                "stage": record["stage_after"], "alpha": float(self.model.seed_slot.alpha),
            })
        return record

    def _stop_agreed(self, requested: bool) -> bool:
        """Whether to stop now. Over several processes the ranks agree (the largest signal
        number asked of any rank; one all-reduce), so that they all stop at the same step."""
        if not self.ranks.distributed:
            return requested
        signum = self.ranks.max(self.stop.signum or 0)
        if signum:
            self.stop.adopt(signum)
        return bool(signum)

    def _epoch_losses(self) -> list[float]:
        """Every step's loss of the epoch, read from the device once; over several processes
        the mean over the ranks (one all-reduce), so that every rank's governor sees the same."""
        if not self.ranks.distributed:
            return self.watch.epoch_losses()
        return self.ranks.mean(self.watch.losses[: self.watch.step]).tolist()

    def _check_ranks_agree(self, record: dict) -> None:
        """Raises :class:`RanksDivergedError` (on every rank: they all see the same list) when
        the ranks' checksums differ after the epoch; rank 0 logs the record first."""
        ranks = record.get("ranks")
        if ranks is None or len({r["checksum"] for r in ranks}) == 1:
            return
        self.run_dir.append(record)
        raise RanksDivergedError(f"the ranks differ after epoch {record['epoch']}: "
                                 + ", ".join(f"rank {r['rank']} {r['checksum']} {r['stage']}" for r in ranks))

    def _wrap(self, stage: SeedStage | None) -> None:
        """Builds the DDP wrapper again when the trained parameters or the slot's stage changed
        since it was built (see :meth:`Ranks.wrap`); a single process trains the model itself."""
        if not self.ranks.distributed:
            return
        slot = self.model.seed_slot
        wanted = (tuple(id(p) for p in self.model.parameters() if p.requires_grad), stage, slot.isolate_gradients)
        if wanted == self._wrapped_for:
            return
        # The old wrapper's gradient hooks go with it: drop it before the new one registers its own.
        self.trained = self.model
        gc.collect()
        self.trained = self.ranks.wrap(self.model)
        self._wrapped_for = wanted

    def _stop_in_epoch(self, epoch: int, progress: dict) -> None:
        """A stop came before the epoch's last step: checkpoint where it stands. With no step
        done the epoch has not changed anything, and the checkpoint of the epoch before is it.
        Several processes stop at the same step; what each rank holds of its own (its losses
        and BatchNorm statistics so far) goes into the checkpoint."""
        if self.ranks.distributed:
            progress["losses_by_rank"] = self.ranks.gather(progress["losses"])
            progress["norm_statistics_by_rank"] = self.ranks.gather(
                [t.detach().cpu().clone() for t in norm_statistics(self.model)])
        if progress["steps_done"] == 0 and self._checkpoint_position == (epoch - 1, 0):
            return
        self._checkpoint(epoch - 1, progress)

    def _set_learning_rate(self, epoch: int, stage: SeedStage | None) -> float:
        lr = _cosine_lr(self.config.lr, epoch, self.config.epochs)
        if stage is not None and self.seed_optimizer is None:
            self.seed_optimizer = _make_optimizer(self.controller.seed_parameters(), self.task_type, lr)
        for optimizer in (self.host_optimizer, self.seed_optimizer):
            for group in optimizer.param_groups if optimizer is not None else ():
                group["lr"] = lr
        return lr

    def _train(self, epoch: int, stage: SeedStage | None, stage_name: str, skip: int = 0, after_skip=None) -> None:
        """One epoch with the trainer function for the slot's stage, from batch ``skip`` on,
        ending early (after the current step) if a stop is requested."""
        from esper_fast.tolaria import train_epoch_blended, train_epoch_incubator_mode, train_epoch_normal

        blending = stage == SeedStage.BLENDING

        def before_batch(i: int) -> None:
            self.tally.first_batch_only(i)
            if blending:
                self.controller.before_blend_batch(i)

        batches = Progress(
            Batches(self.train_batches, before_batch=before_batch, skip=skip, after_skip=after_skip,
                    should_stop=lambda i: self._stop_agreed(self.stop.at_step(epoch, i))),
            self.watch,
            desc=f"epoch {epoch}/{self.config.epochs} {stage_name.lower()}",
            enabled=self.config.progress and self.ranks.is_writer,
            initial=skip,
        )
        common = (self.device, self.task_type)
        trained = self.trained
        with self.tally.tracing(start=False):
            if stage is None:
                train_epoch_normal(trained, batches, self.watch, self.host_optimizer, *common)
            elif stage == SeedStage.TRAINING:
                train_epoch_incubator_mode(trained, batches, self.watch, self.host_optimizer, self.seed_optimizer, *common)
            else:
                train_epoch_blended(trained, batches, self.watch, self.host_optimizer, self.seed_optimizer, *common)

    def _governor_check(self, epoch: int, losses: list[float], events: list[str]) -> bool:
        """Feeds every step's loss to the governor in order; on a panic rolls back. True if it did."""
        panic_loss = next((loss for loss in losses if self.governor.check_vital_signs(loss)), None)
        if panic_loss is None:
            return False
        self.rollbacks += 1
        live = self.controller.live
        # The host optimizer's momentum is reset with the weights: diverged momentum on
        # restored weights would push them straight back into divergence.
        report = self.governor.execute_rollback(optimizer=self.host_optimizer)
        self.seed_optimizer = None
        events.append(f"governor rollback ({report.reason}, loss {panic_loss:.4g}): restored the last healthy epoch")
        if live is not None:
            events += self.controller.cull(epoch, "governor_rollback")
        return True

    def _validate(self, attribution: bool):
        from esper_fast.tolaria import validate_epoch

        with self.tally.tracing(start=False):
            return validate_epoch(
                self.model,
                self.train_batches,
                Batches(self.test_batches, before_batch=self.tally.first_batch_only),
                self.criterion,
                self.device,
                compute_per_class=self.task_type == "classification",
                num_classes=self.num_classes,
                task_type=self.task_type,
                attribution=attribution,
            )

    # ---------------------------------------------------------------- the end
    def finish(self, status: str) -> dict:
        """Appends the summary to the log, draws the plot, prints the closing report.
        ``status``: ``finished`` or ``interrupted`` (a stop was requested)."""
        import esper_fast

        records = self.records
        final = records[-1] if records else {}
        seeds = self.controller.seeds
        out = self.run_dir.path
        summary = {
            "type": "summary",
            "status": status,
            "time": now_iso(),
            "seeds": [dataclasses.asdict(s) for s in seeds],
            "seed_outcome": outcome(seeds),
            "final_val_accuracy": final.get("val_accuracy"),
            "best_val_accuracy": max((r["val_accuracy"] for r in records), default=None),
            "chance_accuracy": None if self.task_type == "lm" else 100.0 / self.num_classes,
            "final_perplexity": final.get("perplexity"),
            "rollbacks": self.rollbacks,
            "world_size": self.ranks.world_size,
            "epochs": len(records),
            "epochs_planned": self.config.epochs,
            "mean_epoch_time_s": sum(r["epoch_time_s"] for r in records) / max(len(records), 1),
            "total_time_s": self.elapsed_before + self._session_time(),
            "kernels_ran": dict(self.tally.counts) if self.tally.enabled else None,
            "kernels_compiled": esper_fast.kernels_available(),
            "reference_mode": self.reference,
            "metrics": str(out / METRICS_FILE),
            "plot": str(out / PLOT_FILE),
        }
        if status == "interrupted":
            summary.update(stopped_by=self.stop.name, checkpoint=str(self.checkpoint_path),
                           resume_command=f"esper-fast train --resume {out}")
        self.log_records.append(summary)
        self.run_dir.append(summary)
        self.draw_plot(summary["seed_outcome"] if status == "finished" else f"stopped after epoch {len(records)}")
        for line in summary_lines(summary, self.device, self.ranks.backend):
            self.echo(line)
        self.run_dir.write_status(status=status, epochs_done=len(records),
                                  stopped_by=self.stop.name if status == "interrupted" else None)
        return summary

    def draw_plot(self, what: str) -> None:
        from esper_fast.train.plotting import plot_run

        config = self.config
        self.run_dir.write_plot(lambda path: plot_run(
            self.records, path, title=f"{config.task} on {config.device}: {what}",
            chance=None if self.task_type == "lm" else 100.0 / self.num_classes, task_type=self.task_type,
        ))


def _samples_per_second(train_batches: Batches, steps: int, seconds: float, world_size: int = 1) -> float | None:
    """Training samples per second over every rank (each rank takes a batch per step)."""
    sampler = getattr(train_batches.source, "batch_sampler", None) or getattr(train_batches.source, "sampler", None)
    batch_size = getattr(sampler, "batch_size", None)
    if not batch_size or seconds <= 0:
        return None
    return world_size * steps * batch_size / seconds
