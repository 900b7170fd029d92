"""What a run prints: one line per epoch and the closing report."""

from __future__ import annotations

import math

from esper_fast.train.controller import SeedRecord


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def epoch_line(record: dict, epochs: int, task_type: str) -> str:
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


def outcome(seeds: list[SeedRecord]) -> str:
    """The seeds' fates in one phrase."""
    if not seeds:
        return "no seed germinated"
    parts = []
    for s in seeds:
        if s.outcome == "live":
            parts.append(f"{s.seed_id} ({s.blueprint}) still live")
        else:
            parts.append(f"{s.seed_id} ({s.blueprint}) {s.outcome} at epoch {s.decided_epoch}: {s.reason}")
    return "; ".join(parts)


def summary_lines(summary: dict, device: str, backend: str | None = None) -> list[str]:
    """The run's closing report, one fact per line (the world size when there are several
    processes; ``backend`` is theirs)."""
    lines = [f"seed outcome: {summary['seed_outcome']}"]
    world = summary.get("world_size", 1)
    if world > 1:
        lines.append(f"world size: {world} processes (torch.distributed {backend}, DistributedDataParallel); "
                     "every rank checked the same model after each epoch")
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
