"""The training loop of every method: AdamW, linear warm-up schedule, per-epoch validation SumR,
best-checkpoint selection, early stopping, and resume that replays a crashed run exactly.

Determinism: the model is initialised right after `torch.manual_seed(seed)`; epoch e's order comes
from its own generator (training/data.py); the RNG (dropout) is re-seeded from (seed, step, rank)
before every step. So nothing depends on how many steps this process has run, and a run resumed from
a checkpoint at step k ends with the same weights as one that never stopped (same device, same
thread count).

Data parallel (`world_size` > 1, under torchrun): each rank takes its slice of every global batch; the
model's losses all-gather the embeddings (`leccr.models.losses.all_gather_with_grad`) as the reference does;
every rank validates (cheap, and all ranks then agree on early stopping without a broadcast); rank 0
writes every file.
"""
from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import torch

from leccr.config import TrainConfig
from leccr.data import FeatureTables
from leccr.models import ModelConfig, create_model_from_config
from leccr.runtime.progress import progress as progress_bar
from leccr.core.io import atomic_write_text
from leccr.runtime.threads import torch_threads
from leccr.training.checkpoint import (HISTORY_FILE, INFO_FILE, clear_state, load_state, save_model, save_state,
                                       save_text_encoder)
from leccr.training.data import MultilingualSamples, batch_loader, epoch_batches
from leccr.training.validate import ValidationSet
from leccr.schemas.core import write_table
from leccr.schemas.train import history_schema

_log = logging.getLogger("leccr.training")


@dataclass
class TrainJob:
    """One method to train: what the stage resolved from its config and upstream artifacts."""

    method: str
    model_config: ModelConfig
    text_encoder_path: str
    features_dir: Path
    method_dir: Path
    languages: list[str]


@dataclass
class Progress:
    """Where training stands; saved in the resume state."""

    epoch: int = 0  # the epoch being run (0-based)
    batch: int = 0  # the next batch of that epoch
    step: int = 0  # optimiser steps done
    best_sumr: float = -math.inf
    best_epoch: int = -1
    stale_epochs: int = 0  # epochs since the best validation SumR
    history: list[dict] = field(default_factory=list)


def linear_warmup_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    """lr factor rising linearly 0 -> 1 over `warmup_steps`, then falling linearly to 0 at `total_steps`
    (the reference's `get_linear_schedule_with_warmup`)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    groups = model.parameter_groups(cfg.lr, cfg.weight_decay, cfg.new_module_lr_multiplier)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 1_009 + rank) % (2**63 - 1)


def autocast_context(cfg: TrainConfig, device: torch.device):
    """bf16 autocast on a GPU (precision auto|bf16); CPU training stays fp32 (CPU bf16 is slower here)."""
    if device.type == "cuda" and cfg.precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


class LossStep(torch.nn.Module):
    """forward(batch) -> the model's loss terms. The losses run inside `forward` so that DDP sees every
    parameter they use (the temperature appears only in the losses) within one forward/backward."""

    def __init__(self, model: torch.nn.Module, gather, autocast) -> None:
        super().__init__()
        self.model, self.gather, self.autocast = model, gather, autocast

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with self.autocast():
            outputs = self.model(batch)
        return self.model.losses(outputs, gather=self.gather)


def history_table(rows: list[dict]) -> pa.Table:
    """One row per step (kind "train": loss_*, lr) and per validation (kind "val": val_*), with nulls
    where a row has no value; columns in a stable order."""
    schema = history_schema(sorted({name for row in rows for name in row}))
    return pa.Table.from_pylist(rows, schema=schema)


@dataclass
class TrainResult:
    method: str
    best_epoch: int
    best_val_sumr: float | None
    epochs_run: int
    steps: int
    stopped_early: bool
    seconds: float
    samples: int
    steps_per_s: float


def train_method(job: TrainJob, cfg: TrainConfig, device: torch.device, rank: int = 0, world_size: int = 1,
                 gather=None, logger: logging.Logger | logging.LoggerAdapter | None = None) -> TrainResult:
    """Train `job.method` to completion (resuming an unfinished run in `job.method_dir`); rank 0 writes
    model.safetensors (best), history.parquet, and train_info.json last. Progress (steps/s, ETA) and one
    line per epoch go to `logger` (the stage passes its run logger, so they show in Prefect).
    torch runs on `cfg.threads` CPU threads throughout: the weights depend on the count."""
    with torch_threads(cfg.threads):
        return _train_method(job, cfg, device, rank, world_size, gather, logger)


def _train_method(job: TrainJob, cfg: TrainConfig, device: torch.device, rank: int, world_size: int,
                  gather, logger: logging.Logger | logging.LoggerAdapter | None) -> TrainResult:
    log = logger or _log
    is_writer = rank == 0
    method_dir = job.method_dir
    method_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    torch.manual_seed(cfg.seed)
    model = create_model_from_config(job.model_config, job.text_encoder_path).to(device)
    use_states = job.model_config.reads_cached_description_states
    tables = FeatureTables.open(job.features_dir)  # one memory-mapped view for training and validation
    samples = MultilingualSamples(tables, job.languages, "train", cfg.missing_descriptions, use_states)
    if len(samples) < cfg.batch_size:
        raise ValueError(f"{job.method}: {len(samples)} training samples ({job.languages}) are fewer than one "
                         f"batch of {cfg.batch_size}; lower train.batch_size")
    validation = (ValidationSet.load(tables, cfg.val_split, job.languages, use_states, cfg.val_caption_kind or "auto")
                  if cfg.val_split is not None else None)
    epochs = cfg.resolved_epochs
    steps_per_epoch = len(samples) // cfg.batch_size
    total_steps = epochs * steps_per_epoch
    optimizer = build_optimizer(model, cfg)
    schedule = linear_warmup_schedule(optimizer, total_steps, int(cfg.warmup_fraction * total_steps))

    progress = Progress()
    state = load_state(method_dir)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        progress = Progress(**state["progress"])
        log.info("%s: resuming at epoch %d, batch %d (step %d of %d)", job.method, progress.epoch + 1,
                 progress.batch, progress.step, total_steps)
    elif is_writer:
        save_text_encoder(job.text_encoder_path, method_dir)

    loss_step = LossStep(model, gather, lambda: autocast_context(cfg, device))
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        # The text encoder's pooler (and ablated terms) get no gradient: let DDP skip them.
        loss_step = DistributedDataParallel(loss_step, device_ids=[device.index] if device.type == "cuda" else None,
                                            find_unused_parameters=True)

    def checkpoint() -> None:
        if is_writer:
            save_state(method_dir, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                    "schedule": schedule.state_dict(), "progress": progress.__dict__})

    stopped_early = False
    steps_run = 0
    loop_started = time.perf_counter()
    bar_context = (progress_bar(total_steps - progress.step, f"train {job.method}", "steps", log) if is_writer
                   else nullcontext(None))
    with bar_context as bar:
        while progress.epoch < epochs and not stopped_early:
            batches = epoch_batches(len(samples), cfg.batch_size, cfg.seed, progress.epoch)
            loader = batch_loader(samples, batches[progress.batch:], cfg.num_workers, rank, world_size)
            epoch_started = time.perf_counter()
            model.train()
            for batch in loader:
                batch = {name: value.to(device, non_blocking=True) for name, value in batch.items()}
                torch.manual_seed(step_seed(cfg.seed, progress.step, rank))
                terms = loss_step(batch)
                terms["total"].backward()
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                progress.step += 1
                progress.batch += 1
                steps_run += 1
                loss_values = {f"loss_{name}": float(value.detach()) for name, value in terms.items()}
                if not math.isfinite(loss_values["loss_total"]):
                    raise FloatingPointError(f"{job.method}: the loss is {loss_values['loss_total']} at step "
                                             f"{progress.step} (epoch {progress.epoch + 1}); lower train.lr")
                progress.history.append({"method": job.method, "kind": "train", "step": progress.step,
                                         "epoch": progress.epoch + 1, "lr": lr, **loss_values})
                if bar is not None:
                    bar.set_postfix(f"epoch {progress.epoch + 1}/{epochs} loss {loss_values['loss_total']:.4f}")
                    bar.update()
                if cfg.checkpoint_every and progress.step % cfg.checkpoint_every == 0 and progress.batch < len(batches):
                    checkpoint()
            epoch_seconds = time.perf_counter() - epoch_started

            # ----- epoch end: validate, keep the best, maybe stop
            epoch_losses = [row["loss_total"] for row in progress.history
                            if row["kind"] == "train" and row["epoch"] == progress.epoch + 1]
            mean_loss = sum(epoch_losses) / max(1, len(epoch_losses))
            if validation is not None:
                scores = validation.evaluate(model, cfg.eval_batch_size, device)
                progress.history.append({"method": job.method, "kind": "val", "step": progress.step,
                                         "epoch": progress.epoch + 1, **scores})
                sumr = scores["val_sumr"]
                improved = sumr > progress.best_sumr
            else:
                sumr, improved = None, True  # no validation: the last epoch is the model
            if improved:
                progress.best_sumr = sumr if sumr is not None else progress.best_sumr
                progress.best_epoch = progress.epoch + 1
                progress.stale_epochs = 0
                if is_writer:
                    save_model(model, method_dir, job.method)
            else:
                progress.stale_epochs += 1
            log.info("%s: epoch %d/%d  loss %.4f  val SumR %s%s  (%.1f s)", job.method, progress.epoch + 1, epochs,
                     mean_loss, "-" if sumr is None else f"{sumr:.2f}", "  best" if improved else "", epoch_seconds)
            progress.epoch += 1
            progress.batch = 0
            if cfg.early_stopping_patience is not None and progress.stale_epochs >= cfg.early_stopping_patience:
                stopped_early = progress.epoch < epochs
                if stopped_early:
                    log.info("%s: no better validation SumR for %d epochs: stopping early after epoch %d",
                             job.method, progress.stale_epochs, progress.epoch)
            if is_writer:
                history = history_table(progress.history)
                write_table(history, method_dir / HISTORY_FILE, history.schema)
            checkpoint()

    loop_seconds = time.perf_counter() - loop_started
    result = TrainResult(
        method=job.method, best_epoch=progress.best_epoch,
        best_val_sumr=None if validation is None else progress.best_sumr,
        epochs_run=progress.epoch, steps=progress.step, stopped_early=stopped_early,
        seconds=round(time.perf_counter() - started, 3), samples=len(samples),
        steps_per_s=round(steps_run / loop_seconds, 3) if loop_seconds > 0 and steps_run else 0.0)
    if is_writer:
        atomic_write_text(method_dir / INFO_FILE, json.dumps(
            {**result.__dict__, "languages": job.languages, "epochs": epochs, "steps_per_epoch": steps_per_epoch,
             "batch_size": cfg.batch_size, "world_size": world_size,
             "dropped_samples": {part.lang: part.dropped for part in samples.parts},
             # timings record how the run went, not what it learnt: left out of the artifact's content
             # digest (leccr.core.artifact.stable_digest), so downstream keys never depend on them
             "volatile": ["seconds", "steps_per_s"]}, indent=2, sort_keys=True))
        clear_state(method_dir)
    return result
