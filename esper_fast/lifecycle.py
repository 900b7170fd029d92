"""A complete seed lifecycle run: a host trained while one seed is germinated, incubated,
blended, judged by counterfactual attribution and fossilized or culled, under the governor.

The built-in controller is deliberately simple and deterministic (no policy): germinate when
validation accuracy stops improving (or after a warm-up), hold each stage for a fixed number
of epochs, then keep the seed only if the model is more accurate with it than with alpha
forced to 0. Training uses the package's own epoch functions; the loop only decides what to
run next, watches the loss for the governor and records what happened.

Per-step governor checks without per-step syncs: the training criterion is wrapped by
:class:`LossWatch`, which copies each step's loss into a device buffer. After the epoch the
buffer is read once and every step's loss goes through ``check_vital_signs`` in order; a
panic rolls the model back to the last healthy epoch's snapshot (culling a live seed) and
the run carries on.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import json
import math
import platform
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn

from esper_fast.leyline import SeedStage

DEFAULT_BLUEPRINT = {"cnn": "conv_light", "transformer": "lora"}
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"


@dataclasses.dataclass
class RunConfig:
    """Everything ``esper-fast train`` takes."""

    task: str = "cifar10"
    epochs: int = 8
    device: str = "cpu"
    data_root: str | None = None
    text_path: str | None = None
    blueprint: str | None = None
    out: str = "runs/latest"
    seed: int = 0
    max_batches: int | None = None
    compile: bool = False
    inject_nan_at: int | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    lr: float | None = None
    progress: bool = True


@dataclasses.dataclass
class LifecycleSchedule:
    """How long the controller holds each stage, in epochs."""

    min_warmup_epochs: int = 2      # host-only epochs before a plateau may trigger germination
    max_warmup_epochs: int = 3      # germinate after this many host-only epochs even without a plateau
    plateau_delta: float = 1.0      # accuracy gain (points) below which the host counts as stalled
    incubation_epochs: int = 1      # TRAINING: alpha 0, the seed learns through the STE
    blending_epochs: int = 2        # BLENDING: alpha ramps 0 -> 1 step by step, then holds at 1
    shadowing_epochs: int = 1
    probation_epochs: int = 1       # PROBATIONARY: the last epoch before the keep/cull decision
    gate_patience: int = 2          # epochs a quality gate may hold the seed before it is culled

    @property
    def ramp_epochs(self) -> int:
        """Epochs of the alpha ramp. With more than one blending epoch the last one holds
        alpha at 1, so the host's BatchNorm running statistics (which lag a moving blend)
        settle before the seed is judged in eval mode."""
        return max(1, self.blending_epochs - 1)

    @property
    def lifecycle_epochs(self) -> int:
        return self.incubation_epochs + self.blending_epochs + self.shadowing_epochs + self.probation_epochs

    @classmethod
    def for_epochs(cls, epochs: int) -> "LifecycleSchedule":
        """The default schedule, with warm-up (and if need be blending) shortened so that a run
        of ``epochs`` still reaches the keep/cull decision, when it can, by its last epoch."""
        schedule = cls()
        if epochs - schedule.lifecycle_epochs - 1 < 1:
            schedule = cls(blending_epochs=1)
        warmup = max(1, min(schedule.max_warmup_epochs, epochs - schedule.lifecycle_epochs - 1))
        return dataclasses.replace(
            schedule, min_warmup_epochs=min(schedule.min_warmup_epochs, warmup), max_warmup_epochs=warmup
        )


# ---------------------------------------------------------------- training-loop helpers

class LossWatch:
    """Criterion wrapper that records every step's loss on the device without syncing.

    ``poison_step`` (0-based, within the current epoch) multiplies that step's loss by NaN:
    the governor demo's injected failure. Backward then fills the gradients with NaN, as a
    real divergence would.
    """

    def __init__(self, criterion: Callable, device: str):
        self.criterion = criterion
        self.device = torch.device(device)
        self.losses = torch.empty(0, device=self.device)
        self.step = 0
        self.poison_step: int | None = None

    def begin_epoch(self, expected_steps: int, poison_step: int | None = None) -> None:
        if self.losses.numel() < expected_steps:
            self.losses = torch.empty(expected_steps, device=self.device)
        self.step = 0
        self.poison_step = poison_step

    def __call__(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = self.criterion(outputs, labels)
        if self.step == self.poison_step:
            loss = loss * float("nan")
        if self.step >= self.losses.numel():
            self.losses = torch.cat([self.losses, torch.empty(max(16, self.step), device=self.device)])
        self.losses[self.step] = loss.detach()
        self.step += 1
        return loss

    def last_loss(self) -> float:
        """The latest step's loss (one device read)."""
        return float(self.losses[self.step - 1]) if self.step else math.nan

    def epoch_losses(self) -> list[float]:
        """Every step's loss of the epoch, read from the device once."""
        return self.losses[: self.step].tolist()


class Batches:
    """An iterable over at most ``limit`` batches of ``source`` that keeps ``len()``.

    ``before_batch(i)`` runs before batch ``i`` is handed out (alpha ramp, kernel tracing).
    """

    def __init__(self, source: Iterable, limit: int | None = None, before_batch: Callable[[int], None] | None = None):
        self.source = source
        self.limit = limit
        self.before_batch = before_batch

    def __len__(self) -> int:
        n = len(self.source)
        return n if self.limit is None else min(n, self.limit)

    def __iter__(self):
        for i, batch in enumerate(itertools.islice(self.source, len(self))):
            if self.before_batch is not None:
                self.before_batch(i)
            yield batch


class KernelTally:
    """Counts the ``esper_fast::*`` operators dispatched while tracing.

    The run traces one training step, one validation batch and the snapshot per epoch, so
    the summary can say which kernels ran without slowing every step down. Disabled under
    ``--compile`` (a dispatch mode would get in the compiler's way).
    """

    def __init__(self, enabled: bool = True):
        from torch.utils._python_dispatch import TorchDispatchMode

        counts = self.counts = collections.Counter()

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.namespace == "esper_fast":
                    counts[func.name().split("::")[-1].split(".")[0]] += 1
                return func(*args, **(kwargs or {}))

        self.enabled = enabled
        self._mode_type = _Mode
        self._mode = None

    def start(self) -> None:
        if self.enabled and self._mode is None:
            self._mode = self._mode_type()
            self._mode.__enter__()

    def stop(self) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)

    @contextlib.contextmanager
    def tracing(self, start: bool = True):
        """Traces the block (``start=False``: only makes sure tracing has ended after it)."""
        if start:
            self.start()
        try:
            yield
        finally:
            self.stop()

    def first_batch_only(self, i: int) -> None:
        """A ``before_batch`` hook: trace batch 0 (forward, backward, step), stop at batch 1.
        Wrap the loop in :meth:`tracing` too, so tracing ends even if the loop raises."""
        if i == 0:
            self.start()
        else:
            self.stop()


class Progress:
    """tqdm over the epoch's batches: batch count, loss (read every ``refresh`` steps) and
    samples per second. Reading the loss syncs, so it happens only every ``refresh`` steps."""

    def __init__(self, batches, watch: LossWatch, desc: str, enabled: bool, refresh: int = 10):
        self.batches = batches
        self.watch = watch
        self.desc = desc
        self.enabled = enabled
        self.refresh = refresh

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        if not self.enabled:
            yield from self.batches
            return
        from tqdm import tqdm

        samples = 0
        start = time.perf_counter()
        with tqdm(total=len(self.batches), desc=self.desc, unit="batch", leave=False, dynamic_ncols=True) as bar:
            for i, batch in enumerate(self.batches):
                yield batch
                samples += batch[1].shape[0]
                if i % self.refresh == 0 or i == len(self.batches) - 1:
                    rate = samples / max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix(loss=f"{self.watch.last_loss():.3f}", samples_per_s=f"{rate:,.0f}", refresh=False)
                bar.update(1)


# ---------------------------------------------------------------- the controller

@dataclasses.dataclass
class SeedRecord:
    seed_id: str
    blueprint: str
    germinated_epoch: int
    outcome: str = "live"            # live | fossilized | culled
    reason: str = ""
    decided_epoch: int | None = None
    contribution: float | None = None


class SeedController:
    """Decides, once per epoch, what the seed slot does next. See the module docstring."""

    def __init__(self, model: nn.Module, blueprint: str, schedule: LifecycleSchedule, epochs: int, steps_per_epoch: int):
        from esper_fast.kasmina import QualityGates

        self.model = model
        self.slot = model.seed_slot
        # The gates' dwell times follow this controller's schedule; the quality checks keep
        # their defaults (G2's accuracy gain, G3's alpha, G5's positive contribution).
        # G2's seed-gradient check needs a ratio this controller does not measure.
        self.slot.gates = QualityGates(
            min_blending_epochs=schedule.blending_epochs,
            min_seed_gradient_ratio=0.0,
            min_training_epochs=schedule.incubation_epochs,
        )
        self.blueprint = blueprint
        self.schedule = schedule
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.seeds: list[SeedRecord] = []
        self.epochs_in_stage = 0
        self.gate_holds = 0
        self.host_epochs = 0
        self.best_accuracy = -math.inf
        self.blend_step = 0

    # -- what the slot is doing
    @property
    def stage(self) -> SeedStage | None:
        state = self.slot.state
        return None if state is None else SeedStage(int(state.stage))

    @property
    def live(self) -> SeedRecord | None:
        return self.seeds[-1] if self.seeds and self.seeds[-1].outcome == "live" else None

    def seed_parameters(self) -> list[nn.Parameter]:
        return list(self.model.get_seed_parameters()) if self.stage is not None else []

    def before_blend_batch(self, i: int) -> None:
        """Per-step alpha: the sigmoid ramp moves one step before every BLENDING batch."""
        self.blend_step += 1
        self.slot.update_alpha_for_step(self.blend_step)

    # -- decisions
    def end_epoch(self, epoch: int, val_accuracy: float, contribution: float | None) -> list[str]:
        """Applies the controller's rules after epoch ``epoch``; returns what happened."""
        events: list[str] = []
        stage = self.stage
        state = self.slot.state
        if state is not None:
            state.metrics.record_accuracy(val_accuracy)
            if contribution is not None:
                state.metrics.counterfactual_contribution = contribution
        if self.live is not None and contribution is not None:
            self.live.contribution = contribution

        if stage is None or stage == SeedStage.FOSSILIZED:
            self.host_epochs += stage is None
            improved = val_accuracy - self.best_accuracy
            self.best_accuracy = max(self.best_accuracy, val_accuracy)
            if stage is None and self._should_germinate(epoch, improved):
                events += self._germinate(epoch, improved < self.schedule.plateau_delta, val_accuracy)
            return events

        self.epochs_in_stage += 1
        s = self.schedule
        if stage == SeedStage.TRAINING and self.epochs_in_stage >= s.incubation_epochs:
            events += self._advance(epoch, SeedStage.BLENDING)
            if self.stage == SeedStage.BLENDING:
                self.blend_step = 0
                self.slot.start_blending(total_steps=max(1, s.ramp_epochs * self.steps_per_epoch))
        elif stage == SeedStage.BLENDING and self.epochs_in_stage >= s.blending_epochs:
            self.slot.set_alpha(1.0)
            events += self._advance(epoch, SeedStage.SHADOWING)
        elif stage == SeedStage.SHADOWING and self.epochs_in_stage >= s.shadowing_epochs:
            events += self._advance(epoch, SeedStage.PROBATIONARY)
        elif stage == SeedStage.PROBATIONARY and self.epochs_in_stage >= s.probation_epochs:
            if contribution is not None and contribution > 0:
                events += self._advance(epoch, SeedStage.FOSSILIZED)
                if self.stage == SeedStage.FOSSILIZED:
                    self._decide(epoch, "fossilized", f"contribution {contribution:+.2f} points")
                    events.append(f"{self.seeds[-1].seed_id} fossilized (contribution {contribution:+.2f} points)")
            else:
                shown = "n/a" if contribution is None else f"{contribution:+.2f}"
                events += self.cull(epoch, "negative_counterfactual", f"contribution {shown} points")
        return events

    def _should_germinate(self, epoch: int, improved: float) -> bool:
        s = self.schedule
        if epoch >= self.epochs:
            return False  # no epoch left for the seed to train
        if self.seeds:
            # After a cull: try again only when a whole lifecycle still fits.
            return self.epochs - epoch >= s.lifecycle_epochs
        plateau = self.host_epochs >= s.min_warmup_epochs and improved < s.plateau_delta
        return plateau or self.host_epochs >= s.max_warmup_epochs

    def _germinate(self, epoch: int, plateau: bool, val_accuracy: float) -> list[str]:
        seed_id = f"seed-{len(self.seeds) + 1}"
        self.model.germinate_seed(self.blueprint, seed_id)
        # The accuracy at germination is the baseline the G2 gate measures improvement from.
        self.slot.state.metrics.record_accuracy(val_accuracy)
        self.seeds.append(SeedRecord(seed_id, self.blueprint, germinated_epoch=epoch))
        self.epochs_in_stage = 0
        self.gate_holds = 0
        why = "validation accuracy plateaued" if plateau else "warm-up over"
        events = [f"germinated {seed_id} ({self.blueprint}): {why}"]
        return events + self._advance(epoch, SeedStage.TRAINING)

    def _advance(self, epoch: int, target: SeedStage) -> list[str]:
        before = self.stage
        result = self.slot.advance_stage(target)
        if self.stage == target:
            self.epochs_in_stage = 0
            self.gate_holds = 0
            return [f"{before.name} -> {target.name}"]
        self.gate_holds += 1
        failed = getattr(result, "checks_failed", None) or getattr(result, "message", None) or result
        events = [f"gate held {before.name} -> {target.name} ({failed})"]
        if self.gate_holds > self.schedule.gate_patience:
            events += self.cull(epoch, "gate_timeout", f"held {self.gate_holds} epochs before {target.name}")
        return events

    def cull(self, epoch: int, reason: str, detail: str = "") -> list[str]:
        """Culls the live seed (if any) and records why."""
        record = self.live
        if record is None:
            return []
        if self.stage is not None:
            self.slot.cull(reason)
        self._decide(epoch, "culled", reason)
        self.epochs_in_stage = 0
        return [f"{record.seed_id} culled: {reason}" + (f" ({detail})" if detail else "")]

    def _decide(self, epoch: int, outcome: str, reason: str) -> None:
        record = self.seeds[-1]
        record.outcome, record.reason, record.decided_epoch = outcome, reason, epoch


# ---------------------------------------------------------------- the run

def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class MetricsLog:
    """Appends one JSON object per line; ``type`` is ``config``, ``epoch`` or ``summary``.
    JSON has no NaN or infinity: NaN is written as ``null``, infinities as ``"inf"``/``"-inf"``."""

    def __init__(self, path: Path):
        self.path = path
        self.handle = open(path, "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.handle.write(json.dumps(_jsonable(record)) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def _base_lr(task_type: str, lr: float | None) -> float:
    return lr or (3e-4 if task_type == "lm" else 0.05)


def _make_optimizer(params, task_type: str, lr: float):
    params = [p for p in params if p.requires_grad]
    if task_type == "lm":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)


def _cosine_lr(base: float, epoch: int, epochs: int) -> float:
    """Cosine decay over the run (epoch is 1-based), so the last epochs settle."""
    return base * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / epochs))


def load_data(config: RunConfig, spec):
    """The task's loaders (see :mod:`esper_fast.data`)."""
    from esper_fast import data

    pin = config.device.startswith("cuda")
    if spec.task_type == "lm":
        seq_len = config.seq_len or (spec.block_size if pin else min(64, spec.block_size or 64))
        if spec.block_size and seq_len > spec.block_size:
            raise data.DataError(f"--seq-len {seq_len} exceeds the model's block size {spec.block_size}")
        return data.tinystories_loaders(
            text_path=config.text_path,
            seq_len=seq_len,
            batch_size=config.batch_size or (32 if pin else 8),
            seed=config.seed,
            pin_memory=pin,
            vocab_size=spec.vocab_size or data.BYTE_VOCAB_SIZE,
        )
    return data.cifar10_loaders(data_root=config.data_root, batch_size=config.batch_size or 128, seed=config.seed, pin_memory=pin)


class LifecycleRun:
    """One ``esper-fast train`` run: the model, its data, optimizers, governor and controller,
    and the per-epoch records. :meth:`execute` runs it to the end."""

    def __init__(self, config: RunConfig, echo: Callable[[str], None] = print):
        import esper_fast
        from esper_fast.ops.mode import using_reference
        from esper_fast.kasmina.host import init_gpt_weights
        from esper_fast.runtime import get_task_spec
        from esper_fast.tolaria import TolariaGovernor, create_model

        self.config, self.echo = config, echo
        self.spec = spec = get_task_spec(config.task)
        self.task_type = spec.task_type
        self.blueprint = config.blueprint or DEFAULT_BLUEPRINT[spec.topology]
        self.num_classes = spec.num_classes or 10
        self.out = Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.reference = using_reference()

        torch.manual_seed(config.seed)
        self.data = load_data(config, spec)
        echo(f"data: {self.data.description}")
        self.model = create_model(spec, config.device)
        if self.task_type == "lm":
            # GPT-2 initialisation: the tied head starts near ln(vocab) instead of ~220 nats.
            init_gpt_weights(self.model.host)
        if config.compile:
            self.model.seed_slot.compilable = True
            self.model.compile()
        self.criterion = nn.CrossEntropyLoss()
        self.watch = LossWatch(self.criterion, config.device)
        vocab = spec.vocab_size if self.task_type == "lm" and spec.vocab_size else self.num_classes
        # A rollback culls the live seed; the controller then expects an empty slot.
        self.governor = TolariaGovernor(self.model, random_guess_loss=math.log(vocab), clear_live_seed_state=True)
        self.base_lr = _base_lr(self.task_type, config.lr)
        self.host_optimizer = _make_optimizer(self.model.get_host_parameters(), self.task_type, self.base_lr)
        self.seed_optimizer = None

        self.train_batches = Batches(self.data.trainloader, config.max_batches)
        self.test_batches = Batches(self.data.testloader, config.max_batches)
        self.steps_per_epoch = len(self.train_batches)
        self.schedule = LifecycleSchedule.for_epochs(config.epochs)
        self.controller = SeedController(self.model, self.blueprint, self.schedule, config.epochs, self.steps_per_epoch)
        self.tally = KernelTally(enabled=not config.compile)
        self.records: list[dict] = []
        self.rollbacks = 0

        self.log = MetricsLog(self.out / METRICS_FILE)
        self.log.write({
            "type": "config",
            **dataclasses.asdict(config),
            "blueprint": self.blueprint,
            "data_source": self.data.source,
            "data": self.data.description,
            "steps_per_epoch": self.steps_per_epoch,
            "schedule": dataclasses.asdict(self.schedule),
            "esper_fast": esper_fast.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "reference_mode": self.reference,
        })
        echo(
            f"train: {config.task} ({spec.topology} host, {self.task_type}) on {config.device}, {config.epochs} epochs x "
            f"{self.steps_per_epoch} steps, blueprint {self.blueprint}, seed {config.seed}"
            + (", reference mode (original algorithms)" if self.reference else "")
        )

    def execute(self) -> dict:
        start = time.perf_counter()
        try:
            for epoch in range(1, self.config.epochs + 1):
                record = self.run_epoch(epoch)
                self.log.write(record)
                self.records.append(record)
                self.echo(_epoch_line(record, self.config.epochs, self.task_type))
        finally:
            self.tally.stop()
            self.log.close()
        return self.finish(time.perf_counter() - start)

    def run_epoch(self, epoch: int) -> dict:
        config, controller = self.config, self.controller
        start = time.perf_counter()
        stage = controller.stage
        stage_name = stage.name if stage is not None else "NONE"
        seed = controller.seeds[-1] if stage is not None else None
        poison = self.steps_per_epoch // 2 if config.inject_nan_at == epoch else None
        lr = self._set_learning_rate(epoch, stage)

        alpha_start = float(self.model.seed_slot.alpha)
        self.watch.begin_epoch(self.steps_per_epoch, poison)
        self._train(epoch, stage, stage_name)
        train_time = time.perf_counter() - start
        alpha = float(self.model.seed_slot.alpha)
        losses = self.watch.epoch_losses()

        events = [f"NaN injected at step {poison + 1}"] if poison is not None else []
        rollback = self._governor_check(epoch, losses, events)
        # The counterfactual only means something once the seed is in the forward (alpha > 0).
        measured = self._validate(attribution=controller.stage is not None and self.model.seed_slot.alpha > 0)
        val_loss, val_acc, train_acc = measured.val_loss, measured.val_accuracy, measured.train_accuracy
        train_eval_loss, per_class, perplexity = measured.train_loss, measured.per_class_acc, measured.perplexity
        attribution = measured.attribution
        contribution = None if attribution is None else float(attribution.seed_contribution)
        if not rollback:
            events += controller.end_epoch(epoch, val_acc, contribution)
            if controller.stage is None:
                self.seed_optimizer = None
            with self.tally.tracing():
                self.governor.snapshot()
        epoch_time = time.perf_counter() - start

        return {
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
            "train_accuracy": train_acc,
            "train_eval_loss": train_eval_loss,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "perplexity": perplexity,
            "per_class_accuracy": per_class,
            "seed_contribution": contribution,
            "real_accuracy": None if attribution is None else float(attribution.real_accuracy),
            "baseline_accuracy": None if attribution is None else float(attribution.baseline_accuracy),
            "rollback": rollback,
            "events": events,
            "steps": len(losses),
            "train_time_s": train_time,
            "eval_time_s": epoch_time - train_time,
            "epoch_time_s": epoch_time,
            "samples_per_s": _samples_per_second(self.train_batches, len(losses), train_time),
        }

    def _set_learning_rate(self, epoch: int, stage: SeedStage | None) -> float:
        lr = _cosine_lr(self.base_lr, epoch, self.config.epochs)
        if stage is not None and self.seed_optimizer is None:
            self.seed_optimizer = _make_optimizer(self.controller.seed_parameters(), self.task_type, lr)
        for optimizer in (self.host_optimizer, self.seed_optimizer):
            for group in optimizer.param_groups if optimizer is not None else ():
                group["lr"] = lr
        return lr

    def _train(self, epoch: int, stage: SeedStage | None, stage_name: str) -> None:
        """One epoch with the trainer function for the slot's stage."""
        from esper_fast.tolaria import train_epoch_blended, train_epoch_incubator_mode, train_epoch_normal

        blending = stage == SeedStage.BLENDING

        def before_batch(i: int) -> None:
            self.tally.first_batch_only(i)
            if blending:
                self.controller.before_blend_batch(i)

        batches = Progress(
            Batches(self.train_batches, before_batch=before_batch),
            self.watch,
            desc=f"epoch {epoch}/{self.config.epochs} {stage_name.lower()}",
            enabled=self.config.progress,
        )
        common = (self.config.device, self.task_type)
        with self.tally.tracing(start=False):
            if stage is None:
                train_epoch_normal(self.model, batches, self.watch, self.host_optimizer, *common)
            elif stage == SeedStage.TRAINING:
                train_epoch_incubator_mode(self.model, batches, self.watch, self.host_optimizer, self.seed_optimizer, *common)
            else:
                train_epoch_blended(self.model, batches, self.watch, self.host_optimizer, self.seed_optimizer, *common)

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
                self.config.device,
                compute_per_class=self.task_type == "classification",
                num_classes=self.num_classes,
                task_type=self.task_type,
                attribution=attribution,
            )

    def finish(self, total_time: float) -> dict:
        """Appends the summary to the log, draws the plot, prints the closing report."""
        import esper_fast
        from esper_fast.plotting import plot_run

        records = self.records
        final = records[-1] if records else {}
        seeds = self.controller.seeds
        summary = {
            "type": "summary",
            "seeds": [dataclasses.asdict(s) for s in seeds],
            "seed_outcome": _outcome(seeds),
            "final_val_accuracy": final.get("val_accuracy"),
            "best_val_accuracy": max((r["val_accuracy"] for r in records), default=None),
            "chance_accuracy": None if self.task_type == "lm" else 100.0 / self.num_classes,
            "final_perplexity": final.get("perplexity"),
            "rollbacks": self.rollbacks,
            "epochs": len(records),
            "mean_epoch_time_s": sum(r["epoch_time_s"] for r in records) / max(len(records), 1),
            "total_time_s": total_time,
            "kernels_ran": dict(self.tally.counts) if self.tally.enabled else None,
            "kernels_compiled": esper_fast.kernels_available(),
            "reference_mode": self.reference,
            "metrics": str(self.out / METRICS_FILE),
            "plot": str(self.out / PLOT_FILE),
        }
        with open(self.out / METRICS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(_jsonable(summary)) + "\n")
        plot_run(
            records,
            self.out / PLOT_FILE,
            title=f"{self.config.task} on {self.config.device}: {summary['seed_outcome']}",
            chance=summary["chance_accuracy"],
        )
        for line in summary_lines(summary, self.config.device):
            self.echo(line)
        return summary


def run(config: RunConfig, echo: Callable[[str], None] = print) -> dict:
    """Runs ``config`` to the end; writes ``metrics.jsonl`` and ``metrics.png`` into
    ``config.out`` and returns the summary record."""
    return LifecycleRun(config, echo).execute()


def _samples_per_second(train_batches: Batches, steps: int, seconds: float) -> float | None:
    sampler = getattr(train_batches.source, "batch_sampler", None) or getattr(train_batches.source, "sampler", None)
    batch_size = getattr(sampler, "batch_size", None)
    if not batch_size or seconds <= 0:
        return None
    return steps * batch_size / seconds


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _epoch_line(record: dict, epochs: int, task_type: str) -> str:
    quality = (
        f"ppl {_fmt(record['perplexity'], '.2f')}" if task_type == "lm" else f"val {_fmt(record['val_accuracy'], '5.1f')}%"
    )
    line = (
        f"epoch {record['epoch']:>2}/{epochs} | loss {_fmt(record['train_loss'], '.4f', 'nan')} | {quality} "
        f"(train {_fmt(record['train_accuracy'], '5.1f')}%) | stage {record['stage']:<12} | alpha {record['alpha']:.2f} | "
        f"contribution {_fmt(record['seed_contribution'], '+.2f'):>6} | {record['epoch_time_s']:.1f}s"
    )
    if record["events"]:
        line += " | " + "; ".join(record["events"])
    return line


def _outcome(seeds: list[SeedRecord]) -> str:
    if not seeds:
        return "no seed germinated"
    parts = []
    for s in seeds:
        if s.outcome == "live":
            parts.append(f"{s.seed_id} ({s.blueprint}) still live")
        else:
            parts.append(f"{s.seed_id} ({s.blueprint}) {s.outcome} at epoch {s.decided_epoch}: {s.reason}")
    return "; ".join(parts)


def summary_lines(summary: dict, device: str) -> list[str]:
    """The run's closing report, one fact per line."""
    lines = [f"seed outcome: {summary['seed_outcome']}"]
    if summary["chance_accuracy"] is not None:
        lines.append(
            f"accuracy: final {_fmt(summary['final_val_accuracy'], '.1f')}%, best {_fmt(summary['best_val_accuracy'], '.1f')}% "
            f"(chance {summary['chance_accuracy']:.0f}%)"
        )
    else:
        lines.append(f"perplexity: final {_fmt(summary['final_perplexity'], '.2f')}")
    lines.append(f"governor rollbacks: {summary['rollbacks']}")
    lines.append(
        f"time: {summary['mean_epoch_time_s']:.2f}s per epoch, {summary['total_time_s']:.1f}s total"
    )
    backend = "cuda" if device.startswith("cuda") else "cpu"
    compiled = summary["kernels_compiled"].get(backend, [])
    if summary["reference_mode"]:
        lines.append("kernels: reference mode, the original pure-PyTorch algorithms ran")
    elif summary["kernels_ran"] is None:
        lines.append(f"kernels compiled for {backend}: {', '.join(compiled) or 'none'} (not traced under --compile)")
    else:
        ran = ", ".join(f"{name} x{count}" for name, count in sorted(summary["kernels_ran"].items())) or "none"
        lines.append(f"kernels ran (traced per epoch: one training step, one validation batch, the snapshot): {ran}")
    lines.append(f"log: {summary['metrics']}  plot: {summary['plot']}")
    return lines
