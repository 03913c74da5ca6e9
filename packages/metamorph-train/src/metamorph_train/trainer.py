"""The trainer: AdamW with warm-up + cosine/linear schedule, gradient accumulation and
clipping, bf16 autocast, token-count-normalised losses, an optional moving average of the
weights (``train.ema_decay``, :mod:`metamorph_train.ema`), atomic checkpoints every N steps
(last K kept) and exact resume of weights, optimizer, averages, scheduler, RNG and data
position.
What it optimises is an :class:`~metamorph_train.objectives.Objective`; which parameters
train is the objective's choice (:meth:`~metamorph_train.objectives.Objective.trainable`),
logged at start as parameter groups with their counts.

Loss normalisation: over one optimiser step the text loss is the sum of token
losses over all micro-batches divided by the number of text tokens in all of them (the visual
loss likewise), not a mean of per-micro-batch means.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from metamorph_train import checkpointing, distributed, tracking
from metamorph_train.data.loader import Loader
from metamorph_train.data.mixture import Mixture
from metamorph_train.ema import WeightAverage
from metamorph_train.objectives.base import Objective
from metamorph_train.trainer_config import TRACKING_FIELDS, TrainerConfig


def adamw(params: list[torch.nn.Parameter], **options: Any) -> torch.optim.AdamW:
    """AdamW, fused (one kernel over all parameters instead of a dozen per parameter) where
    torch has the fused kernel for the parameters' device and dtype, else torch's default
    implementation."""
    try:
        return torch.optim.AdamW(params, fused=True, **options)
    except RuntimeError:  # a device or dtype without the fused kernel
        return torch.optim.AdamW(params, **options)


class Trainer:
    """Trains ``objective`` (an :class:`~metamorph_train.objectives.Objective`, e.g.
    ``VPiTObjective(model, policy="full")``) on items drawn from ``data``."""

    def __init__(
        self,
        objective: Objective,
        data: Mixture,
        config: TrainerConfig,
        log: Callable[[str], None] | None = print,
        *,
        eval_data: dict[str, Any] | None = None,
        run_config: dict[str, Any] | None = None,
        loggers: list[Any] | None = None,
        num_workers: int = 0,
        prefetch: int = 2,
    ) -> None:
        """``num_workers``: data-loader worker processes per rank that read and preprocess
        the items (0: this process), ``prefetch`` micro-batches ahead each
        (:mod:`metamorph_train.data.loader`; the data does not depend on either). ``eval_data``: held-out name -> map-style dataset, scored every
        ``config.eval_every`` steps (:mod:`metamorph_train.validation`). ``run_config``: the
        resolved recipe, written to ``output_dir/recipe.yaml`` and logged. ``loggers``:
        :class:`~metamorph_train.loggers.Logger` objects (default: built from
        ``config.loggers`` on rank 0)."""
        if config.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(
                f"unknown schedule '{config.schedule}'; use cosine, linear or constant"
            )
        if not isinstance(objective, Objective):
            raise TypeError(
                f"Trainer trains an Objective, got {type(objective).__name__}; wrap a unified "
                "model as VPiTObjective(model, policy='full') (metamorph_train.objectives)"
            )
        self.objective = objective
        model = objective.module
        self.model, self.data, self.config, self.log = model, data, config, log
        names = {n for n, p in model.named_parameters() if objective.trainable(n, p)}
        if not names:
            raise ValueError("no trainable parameters were selected")
        for name, param in model.named_parameters():  # exactly the selected ones get gradients
            param.requires_grad_(name in names)
        self.out = Path(config.output_dir)
        # Under torchrun every rank draws the same global batch and keeps its share, so a run
        # on N processes matches one process with N times the per-rank batch.
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        if self.log is not None and self.rank == 0:
            for line in parameter_groups(model, names):
                self.log(line)
        if not isinstance(config.checkpoint_every, int) or config.checkpoint_every < 1:
            raise ValueError(
                f"train.checkpoint_every must be an integer >= 1, got {config.checkpoint_every!r}"
            )
        if config.gradient_checkpointing:
            if config.checkpoint_every == 1 and not config.checkpoint_offload:
                self.objective.enable_gradient_checkpointing()  # objectives of any version
            else:
                self.objective.enable_gradient_checkpointing(
                    config.checkpoint_every, config.checkpoint_offload
                )
        elif config.checkpoint_every != 1 or config.checkpoint_offload:
            raise ValueError(
                "train.checkpoint_every and train.checkpoint_offload choose how activations are "
                "recomputed; set train.gradient_checkpointing: true for them to apply"
            )
        if config.compile:
            units = self.objective.shard_units()
            if not units:
                raise ValueError(
                    f"train.compile compiles the LLM's blocks, and objective "
                    f"'{self.objective.name}' has none; leave train.compile off"
                )
            for unit in units:  # each block once; the same graph serves every block
                unit.compile()
        device = config.device
        if device == "auto":
            local = int(os.environ.get("LOCAL_RANK", 0))
            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        self.strategy = config.strategy if self.world > 1 else None
        meta = distributed.is_meta(model)
        if meta and not (config.meta_init and self.strategy == "fsdp" and self.rank > 0):
            raise ValueError(
                "the model is on the meta device; only ranks other than 0 may build it there, "
                "with train.meta_init=true and train.strategy=fsdp under torchrun"
            )
        whole = model.state_dict() if config.meta_init and self.rank == 0 else None
        if not meta:
            model.to(device)
        self.forward_model = (
            distributed.wrap(
                model,
                self.strategy,
                self.objective.shard_units() if self.strategy == "fsdp" else None,
                device,
            )
            if self.strategy
            else model
        )
        if config.meta_init and self.strategy == "fsdp":
            distributed.materialise_from_rank0(model, whole, device)
        # after sharding: FSDP2 replaces parameters with sharded ones of the same names
        self.params = {n: p for n, p in model.named_parameters() if n in names}
        self.ema = None
        if config.ema_decay:
            if self.strategy == "fsdp":
                raise ValueError(
                    "train.ema_decay keeps an average of the whole trained weights, which "
                    "train.strategy=fsdp shards; average under one process or DDP, or set "
                    "train.ema_decay: 0"
                )
            self.ema = WeightAverage(self.params, config.ema_decay)
        # this rank's share of each global micro-batch, read by worker processes; its state
        # (the mixture's position and generator) is the checkpoint's data position
        self.loader = Loader(
            data, objective, config.batch_size, self.rank, self.world, num_workers, prefetch
        )
        self._skippable = any(
            getattr(d, "on_error", "raise") == "skip" for d in data.datasets.values()
        )
        self.run_config, self.loggers = run_config, loggers
        self.validator = tracking.validator(self, eval_data)

    def _run_signature(self) -> dict[str, Any]:
        c = dataclasses.asdict(self.config)
        for k in (
            "output_dir",
            "log_every",
            "save_every",
            "keep_last",
            "steps",
            "progress",
            "meta_init",
            *TRACKING_FIELDS,
        ):
            c.pop(k)
        if not c["ema_decay"]:  # as checkpoints written before the setting existed record it
            c.pop("ema_decay")
        signature = self.objective.signature()
        return {**c, **signature, "params": sorted(self.params), "data": self.data.names}

    def _schedule(self, optimizer: torch.optim.Optimizer) -> Any:
        from transformers import (
            get_constant_schedule_with_warmup,
            get_cosine_schedule_with_warmup,
            get_linear_schedule_with_warmup,
        )

        warmup = int(self.config.warmup_ratio * self.config.steps)
        if self.config.schedule == "constant":
            return get_constant_schedule_with_warmup(optimizer, warmup)
        make = (
            get_cosine_schedule_with_warmup
            if self.config.schedule == "cosine"
            else get_linear_schedule_with_warmup
        )
        return make(optimizer, warmup, self.config.steps)

    @property
    def skipped(self) -> int:
        """Records and items skipped so far (bad input with ``on_error: skip``)."""
        return self.loader.skipped

    def _batch(self, step: int, micro: int) -> dict[str, Any]:
        share = self.loader.next()
        while self._skippable and self._any_rank_empty(share):
            # every item of some rank's share failed to read and was skipped: all ranks draw
            # the next micro-batch instead (so they stay at the same position)
            share = self.loader.next()
        seed = ((self.config.seed * 1_000_003 + step) * 1009 + micro) * 4099 + self.rank
        return self.objective.batch(share, seed % (2**63))

    def run(self, resume: bool = True) -> dict[str, Any]:
        """Train to ``config.steps`` (continuing from the newest checkpoint when ``resume``);
        returns a summary. Checkpoints land in ``output_dir/step-NNNNNNN``; metrics go to the
        loggers (default ``output_dir/metrics.jsonl``), the run's recipe and information to
        ``recipe.yaml`` / ``run_info.json``, validation to ``output_dir/eval/step-NNNNNNN``."""
        c = self.config
        torch.manual_seed(c.seed)
        random.seed(c.seed)
        self.out.mkdir(parents=True, exist_ok=True)
        optimizer = adamw(list(self.params.values()), lr=c.lr, weight_decay=c.weight_decay)
        scheduler = self._schedule(optimizer)
        # saves cut short removed; the newest checkpoint (either layout) loaded when resuming
        chosen = {k: optimizer.defaults.get(k) for k in ("fused", "foreach")}
        start = checkpointing.begin(self, optimizer, scheduler, resume)
        for group in optimizer.param_groups:  # a checkpoint's groups carry its implementation
            group.update(chosen)
        self.model.train()
        track = tracking.start(self, start)  # rank 0's loggers (metrics.jsonl, ...); else none
        finished = False
        bar = None
        if c.progress and self.rank == 0 and self.log is not None:
            from tqdm.auto import tqdm

            bar = tqdm(total=c.steps, initial=start, desc="train", unit="step", leave=False)
        try:
            last: dict[str, Any] = {}
            for step in range(start + 1, c.steps + 1):
                last = self._step(optimizer, scheduler, step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        {t: f"{last[f'{t}_loss']:.3f}" for t in self.objective.terms},
                        refresh=False,
                    )
                # printed above the bar, not through it
                emit = bar.write if bar is not None and self.log is print else self.log
                if self.rank == 0 and (step % c.log_every == 0 or step == c.steps):
                    track.log_metrics(step, {k: v for k, v in last.items() if k != "step"})
                    if self.log:
                        emit(self._describe(last))
                if self.validator is not None and self.validator.due(step):
                    report = self.validator.run(step, self, track)
                    if report is not None and self.log:
                        emit(report)
                if (c.save_every and step % c.save_every == 0) or step == c.steps:
                    # every rank takes part (sharded under FSDP2, else rank 0 writes one file)
                    checkpointing.save(self, step, optimizer, scheduler)
            if self.ema is not None:  # the final model holds the averaged weights
                self.ema.copy_to_params()
            finished = True
        finally:
            track.finish(success=finished)
            self.loader.close()
            if bar is not None:
                bar.close()
        return {"steps": c.steps, "skipped_items": self.skipped, **last}

    def _step(self, optimizer: torch.optim.Optimizer, scheduler: Any, step: int) -> dict[str, Any]:
        c, objective = self.config, self.objective
        began = time.perf_counter()
        micro = [self._batch(step, k) for k in range(c.grad_accum)]
        terms = len(objective.terms)
        counts = torch.zeros(terms, dtype=torch.float64)
        for b in micro:
            counts += torch.tensor(objective.counts(b), dtype=torch.float64)
        self._all_reduce(counts)  # the counts of the whole step, over every rank
        totals = counts.clamp(min=1.0).tolist()
        optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(terms, dtype=torch.float64)
        for k, batch in enumerate(micro):
            last_micro = k == len(micro) - 1
            sync = (
                contextlib.nullcontext()
                if last_micro or self.strategy is None
                else distributed.no_sync(self.forward_model, self.strategy)
            )
            device = objective.device().type
            with sync, torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=c.bf16):
                parts = objective.loss_sums(self.forward_model, batch)
                # sums over the step's global counts; DDP averages gradients over ranks, so the
                # world size scales them back to sums
                loss = self.world * sum(
                    w * s / n for w, s, n in zip(objective.weights, parts, totals, strict=True)
                )
                loss.backward()
            sums += torch.tensor([p.item() for p in parts], dtype=torch.float64)
        self._all_reduce(sums)
        if c.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), c.max_grad_norm)
        optimizer.step()
        if self.ema is not None:
            self.ema.update()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        done = sum(objective.throughput(b) for b in micro) * self.world
        out: dict[str, Any] = {"step": step}
        for term, unit, total, count, value in zip(
            objective.terms, objective.units, totals, counts.tolist(), sums.tolist(), strict=True
        ):
            out[f"{term}_loss"] = value / total
            out[f"{term}_{unit}"] = int(count)
        out["lr"] = lr
        out[f"{objective.throughput_unit}_per_s"] = done / max(time.perf_counter() - began, 1e-9)
        return out

    def _describe(self, m: dict[str, Any]) -> str:
        losses = "  ".join(f"{t} {m[f'{t}_loss']:.4f}" for t in self.objective.terms)
        unit = self.objective.throughput_unit
        return (
            f"step {m['step']}/{self.config.steps}  {losses}  lr {m['lr']:.2e}  "
            f"{m[f'{unit}_per_s']:.0f} {unit}/s"
        )

    def _any_rank_empty(self, share: list[Any]) -> bool:
        empty = torch.tensor([0.0 if share else 1.0], dtype=torch.float64)
        self._all_reduce(empty)
        return bool(empty.item() > 0)

    def _all_reduce(self, tensor: torch.Tensor) -> None:
        distributed.all_reduce_sum(tensor)


def parameter_groups(model: torch.nn.Module, trained: set[str]) -> list[str]:
    """Lines naming the parameter groups of ``model`` (its top-level submodules) that train
    and those that stay frozen, with tensor and parameter counts."""
    groups: dict[tuple[bool, str], list[int]] = {}
    for name, param in model.named_parameters():
        key = (name in trained, name.split(".", 1)[0])
        count = groups.setdefault(key, [0, 0])
        count[0] += 1
        count[1] += param.numel()

    def line(train: bool) -> str:
        parts = [
            f"{group} ({tensors} tensor{'s' if tensors != 1 else ''}, {numel:,} parameters)"
            for (t, group), (tensors, numel) in sorted(groups.items())
            if t == train
        ]
        total = sum(n for (t, _), (_, n) in groups.items() if t == train)
        return f"{'training' if train else 'frozen'}: {', '.join(parts) or 'nothing'}; {total:,} in all"

    return [line(True), line(False)]
