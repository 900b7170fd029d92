"""How a run begins, is saved, resumed and ends: what :class:`RunSession` writes to the run
folder and reads back from a checkpoint; :class:`~esper_fast.train.loop.LifecycleRun` adds
the training.

Checkpoints and resume. A checkpoint is written when the run starts (epoch 0), after every
epoch (a rolled-back epoch included: its model is the restored healthy one) and when a stop
is requested in the middle of an epoch; it holds the position (epochs done, steps done of
the next), the model, optimizers, controller, governor, every random generator and the log
so far. A run resumed from it continues exactly where it was: a mid-epoch checkpoint also
holds the steps' losses, the batch-order generator as the epoch began (the same batches are
drawn again and the done ones skipped), torch's generator as the stop came (set once the
skipped batches are drawn), and the governor's snapshot tensors (the model has moved on
from them). On CPU a resumed run ends with the same records, bit for bit, as one that was
never stopped. :class:`~esper_fast.train.checkpoint.Checkpoint` is that record; each epoch's
is a :class:`~esper_fast.train.report.EpochRecord`.
"""

from __future__ import annotations

import dataclasses
import os
import time

import esper_fast
from esper_fast.train import checkpoint
from esper_fast.train.checkpoint import Checkpoint, EpochProgress
from esper_fast.train.console import COLUMNS
from esper_fast.train.plotting import plot_run, run_title
from esper_fast.train.report import (
    ConfigRecord,
    EpochRecord,
    ResumeRecord,
    SummaryRecord,
    device_description,
    outcome,
    summary_lines,
)
from esper_fast.train.run_dir import METRICS_FILE, PLOT_FILE, STOPPED_BY, now_iso, resume_command


class RunSession:
    """The run's records and folder: the log's config record and ``run.json`` of a new run
    (:meth:`start`), a run put back from a checkpoint (:meth:`resume_from`), a checkpoint
    written (:meth:`_checkpoint`), and the summary, plot and closing report
    (:meth:`finish`). It reads what :class:`~esper_fast.train.loop.LifecycleRun` builds:
    ``config``, ``run_dir``, ``echo``, ``ranks``, ``stop``, ``data``, ``model``,
    ``optimizers``, ``controllers``, ``governor``, ``tally`` and the rest of its state.
    """

    # ---------------------------------------------------------------- beginning
    def _announce(self) -> None:
        config = self.config
        self.echo(f"data: {self.data.description}")
        candidates = getattr(self, "candidates", {})
        if config.slots is None and not candidates:
            what, seeds = "blueprint", [config.blueprint]
        elif config.slots is None:
            what, seeds = "candidates", list(candidates[next(iter(candidates))])
        else:
            what = f"slot{'s' if self.several else ''}"
            seeds = [f"{slot_id} ({'/'.join(candidates.get(slot_id, (blueprint,)))})"
                     for slot_id, blueprint in self.blueprints.items()]
        run = f"train: {config.task} ({self.spec.topology} host, {self.task_type}) on {config.device}, " \
              f"{config.epochs} epochs x {self.steps_per_epoch} steps"
        rest = f"seed {config.seed}" + (
            f", {self.ranks.world_size} processes (DDP over {self.ranks.backend}, "
            f"batch {config.batch_size} per process)" if self.ranks.distributed else "") + (
            ", reference mode (original algorithms)" if self.reference else "")
        line = f"{run}, {what} {', '.join(seeds)}, {rest}"
        if len(line) <= COLUMNS:
            self.echo(line)
            return
        # Too wide (several slots, candidates, processes): the seeds on lines of their own.
        self.echo(f"{run}, {rest}")
        lines = [f"  {what}:"]
        for seed in seeds:
            if len(lines[-1]) + 1 + len(seed) + 1 > COLUMNS:
                lines.append("   ")
            lines[-1] += f" {seed},"
        lines[-1] = lines[-1].rstrip(",")
        for text in lines:
            self.echo(text)

    def start(self, command: str) -> None:
        """A new run: the log's config record, ``run.json`` and the epoch-0 checkpoint."""
        self._announce()
        config_record = ConfigRecord.now(
            command=command, settings=self.config, task_type=self.task_type, chance_accuracy=self.chance,
            data_source=self.data.source, data=self.data.description, data_fingerprint=self.data.fingerprint,
            steps_per_epoch=self.steps_per_epoch, schedule=dataclasses.asdict(self.schedule),
            world_size=self.ranks.world_size, backend=self.ranks.backend, device_name=device_description(self.device),
            reference_mode=self.reference,
        )
        self.log_records = [config_record.to_log()]
        self.run_dir.start_log(self.log_records)
        self._write_running_status(command, epochs_done=0, steps_done=0, checkpoint=None)
        self._checkpoint(0)

    def _write_running_status(self, command: str, **position) -> None:
        """``run.json`` as this process takes the run on: the run itself (from the log's config
        record, the same for every session of the run) and where it stands."""
        self.run_dir.write_status(
            status="running", command=command, pid=os.getpid(), task=self.config.task, epochs=self.config.epochs,
            started_at=ConfigRecord.from_log(self.log_records[0]).started_at, **position, stopped_by=None,
            world_size=self.ranks.world_size,
        )

    def resume_from(self, state: Checkpoint, path, command: str, previous_status: dict | None = None) -> None:
        """Puts the run back where ``state`` (the checkpoint read from ``path``) left it and
        rewrites the log to what the checkpoint had seen, followed by a ``resume`` record.
        ``previous_status``: what ``run.json`` said of the session that stopped."""
        state.check_resumable(world_size=self.ranks.world_size, steps_per_epoch=self.steps_per_epoch,
                              data_fingerprint=self.data.fingerprint, text_path=self.config.text_path)
        self.optimizers.seeds = state.restore(
            model=self.model, governor=self.governor, controllers=self.controllers,
            host_optimizer=self.optimizers.host, make_seed_optimizer=self.optimizers.seed_optimizer,
        )
        self.optimizers.rivals = state.restore_rival_optimizers(self.optimizers.rival_optimizer)
        self.log_records = list(state.log)
        self.records = [EpochRecord.from_log(r) for r in self.log_records if r.get("type") == EpochRecord.TYPE]
        self.rollbacks = state.rollbacks
        self.tally.counts.update(state.kernels)
        self.elapsed_before = state.elapsed_s
        self.next_epoch = state.epochs_done + 1
        self.progress = state.progress
        self._resume_rng = state.rng
        # Rank 0's generators on every rank: the ranks draw the same numbers (the per-epoch
        # checksum covers the generators too), so they all had these.
        checkpoint.restore_rng(state.rng, self.device, self.data.shuffle_generator,
                               torch_generators=self.progress is None)
        self.checkpoint_path = path
        self._checkpoint_position = (state.epochs_done, state.steps_done)

        self._announce()
        previous = previous_status or {}
        self.log_records.append(ResumeRecord(
            time=now_iso(), command=command, checkpoint=path.name, epochs_done=state.epochs_done,
            steps_done=state.steps_done, stopped_by=previous.get("stopped_by") or STOPPED_BY.get(previous.get("status")),
            stopped_at=previous.get("updated_at"),
        ).to_log())
        self.run_dir.start_log(self.log_records)
        self._write_running_status(command, epochs_done=state.epochs_done, steps_done=state.steps_done,
                                   checkpoint=str(path))
        where = f"epoch {self.next_epoch}" + (f", step {state.steps_done + 1}" if state.steps_done else "")
        self.echo(f"resume: from {path} at {where} of {self.config.epochs} epochs")

    # ---------------------------------------------------------------- checkpoints
    def _checkpoint(self, epochs_done: int, progress: EpochProgress | None = None) -> None:
        """Writes the run's state after ``epochs_done`` epochs (and ``progress`` of the next).
        Rank 0 alone; no collective here, so the ranks may take this call differently."""
        if not self.ranks.is_writer:
            return
        state = Checkpoint.capture(
            config=self.config, world_size=self.ranks.world_size, epochs_done=epochs_done, progress=progress,
            model=self.model, host_optimizer=self.optimizers.host, seed_optimizers=self.optimizers.seeds,
            rival_optimizers=self.optimizers.rivals,
            controllers=self.controllers, governor=self.governor, device=self.device,
            shuffle=self.data.shuffle_generator, log=self.log_records, rollbacks=self.rollbacks,
            kernels=dict(self.tally.counts), elapsed_s=self.elapsed_before + self._session_time(),
        )
        path = self.run_dir.save_checkpoint(state.to_payload(), state.epochs_done, state.steps_done)
        self.checkpoint_path = path
        self._checkpoint_position = (state.epochs_done, state.steps_done)
        self.run_dir.write_status(epochs_done=state.epochs_done, steps_done=state.steps_done, checkpoint=str(path))

    @property
    def stopped_at(self) -> tuple[int, int]:
        """(epochs done, steps done of the next) as the last checkpoint holds them: where a
        stopped run stands, and where a resume goes on from (on the writing rank)."""
        return self._checkpoint_position

    def _session_time(self) -> float:
        start = getattr(self, "_session_start", None)
        return 0.0 if start is None else time.perf_counter() - start

    # ---------------------------------------------------------------- the end
    def finish(self, status: str) -> dict:
        """Appends the summary to the log, draws the plot, prints the closing report.
        ``status``: ``finished`` or ``interrupted`` (a stop was requested)."""
        records = self.records
        final = records[-1] if records else None
        seeds = self.controllers.seeds
        out = self.run_dir.path
        interrupted = status == "interrupted"
        summary = SummaryRecord(
            status=status,
            time=now_iso(),
            seeds=[s.to_log() for s in seeds],
            seed_outcome=outcome(seeds, list(self.controllers.by_slot) if self.several else None),
            slots=self.blueprints if self.several else None,
            final_val_accuracy=final.val_accuracy if final is not None else None,
            best_val_accuracy=max((r.val_accuracy for r in records), default=None),
            chance_accuracy=self.chance,
            final_perplexity=final.perplexity if final is not None else None,
            rollbacks=self.rollbacks,
            world_size=self.ranks.world_size,
            epochs=len(records),
            epochs_planned=self.config.epochs,
            mean_epoch_time_s=sum(r.epoch_time_s for r in records) / max(len(records), 1),
            total_time_s=self.elapsed_before + self._session_time(),
            kernels_ran=dict(self.tally.counts) if self.tally.enabled else None,
            kernels_compiled=esper_fast.kernels_available(),
            reference_mode=self.reference,
            metrics=str(out / METRICS_FILE),
            plot=str(out / PLOT_FILE),
            stopped_by=self.stop.name if interrupted else None,
            checkpoint=str(self.checkpoint_path) if interrupted else None,
            resume_command=resume_command(out) if interrupted else None,
        ).to_log()
        self.log_records.append(summary)
        self.run_dir.append(summary)
        # The config record with the device this session ran on (--resume may change it).
        self.draw_plot(run_title({**self.log_records[0], "device": self.config.device}, records, summary,
                                 position=self.stopped_at))
        for line in summary_lines(summary, self.device, self.ranks.backend):
            self.echo(line)
        self.run_dir.write_status(status=status, epochs_done=len(records),
                                  stopped_by=self.stop.name if status == "interrupted" else None)
        return summary

    def draw_plot(self, title: str) -> None:
        self.run_dir.write_plot(lambda path: plot_run(
            self.records, path, title=title,
            chance=self.chance, task_type=self.task_type,
        ))


