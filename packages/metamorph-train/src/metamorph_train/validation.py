"""Validation during training: held-out sources scored, fixed prompts generated, every
``train.eval_every`` steps, under a time budget.

- Losses: each held-out source (``data.eval_sources``, read whole) is cut into batches of
  ``train.batch_size`` items per rank, in file order, at most ``train.eval_batches`` of them
  (0: all); the objective's loss *sums* and *counts* are added over batches and ranks and
  divided once, as training normalises a step. Logged as ``SOURCE/TERM_loss`` and
  ``SOURCE/TERM_UNIT`` (e.g. ``held/text_loss``, ``held/visual_tokens``), namespace ``eval``.
- Prompts (``train.eval_prompts``: a list, or a file of one prompt per line / a JSON list /
  JSONL of strings or ``{"prompt": ...}``): a unified model (objective ``vpit``) answers each
  with greedy decoding (``module.generate``) and, when a visual decoder is attached, draws an
  image for each (``module.generate_image(..., decode_images=True)``); logged as text and one
  PNG grid. ``train.eval_generation`` holds generation options (default
  ``{max_new_tokens: 64}``; ``decoding`` defaults to seed 0). Only rank 0 generates; under
  FSDP2 prompts are skipped (generation needs unsharded weights: generate from a checkpoint).
- Budget: when ``train.eval_budget_s`` (0: none) has passed, the remaining batches and prompts
  are skipped and the log says how much was done (``batches``/``batches_planned``,
  ``prompts``/``prompts_planned``, ``budget_exceeded``). Ranks agree on the stop.
- Everything is also written to ``output_dir/eval/step-NNNNNNN/`` (``metrics.json``,
  ``samples.json``, ``images.png``).

Training is not perturbed: validation runs under ``torch.no_grad()`` with every submodule in
eval mode and its own mode restored afterwards; the torch (CPU and CUDA), Python and NumPy
random states are saved before and restored after; held-out items never touch the training
mixture (its generator and position), and batches get seeds of their own. A run with
validation logs the same training losses as one without.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from metamorph_train import distributed
from metamorph_train.loggers import kept_rng


def load_prompts(value: Any) -> list[str]:
    """``train.eval_prompts`` -> prompts: ``None`` -> none; a list of strings; or a path to
    a ``.json`` list, a ``.jsonl`` of strings / ``{"prompt": ...}``, or any other text file
    (one prompt per non-empty line)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        if not all(isinstance(p, str) and p for p in value):
            raise ValueError(
                f"recipe key 'train.eval_prompts' must hold non-empty strings, got {value!r}"
            )
        return list(value)
    if not isinstance(value, str):
        raise ValueError(
            f"recipe key 'train.eval_prompts' = {value!r} must be a list of prompts or a file"
        )
    path = Path(value)
    if not path.is_file():
        raise ValueError(
            f"recipe key 'train.eval_prompts' = '{value}' is no file; give a list of prompts, "
            "or a file (.json list, .jsonl, or one prompt per line)"
        )
    text = path.read_text()
    if path.suffix == ".json":
        return load_prompts(json.loads(text))
    lines = [line for line in text.splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in lines]
        return load_prompts([r["prompt"] if isinstance(r, dict) else r for r in rows])
    return lines


@contextlib.contextmanager
def isolated(module: torch.nn.Module) -> Iterator[None]:
    """Run a block on ``module`` without leaving a trace on training: no gradients, every
    submodule in eval mode (each one's mode restored after), the torch / Python / NumPy
    random states restored after (:func:`~metamorph_train.loggers.kept_rng`)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with kept_rng(), torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def image_grid(images: list[Any]) -> Any:
    """PIL images in a near-square grid (row by row), on black."""
    from PIL import Image

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid


class Validator:
    """Validation of a :class:`~metamorph_train.trainer.Trainer`'s objective (see the module
    docstring). ``datasets``: held-out name -> map-style dataset of the objective's items."""

    def __init__(
        self,
        objective: Any,
        datasets: Mapping[str, Any],
        config: Any,
        out: Path,
    ) -> None:
        c = config
        for key in ("eval_every", "eval_batches", "eval_budget_s"):
            if getattr(c, key) < 0:
                raise ValueError(f"recipe key 'train.{key}' must be >= 0, got {getattr(c, key)}")
        for name, data in datasets.items():
            if getattr(data, "streaming", False):
                raise ValueError(
                    f"held-out source '{name}' is streaming; data.eval_sources are read whole "
                    "(map-style): set its streaming: false"
                )
        self.objective, self.datasets, self.config = objective, dict(datasets), c
        self.out = Path(out)
        self.prompts = load_prompts(c.eval_prompts)
        if not self.datasets and not self.prompts:
            raise ValueError(
                f"train.eval_every = {c.eval_every} but there is nothing to validate: give "
                "data.eval_sources and/or train.eval_prompts, or set train.eval_every: 0"
            )
        if self.prompts and not hasattr(objective.module, "generate_image"):
            raise ValueError(
                f"train.eval_prompts needs a model that generates (objective vpit); objective "
                f"'{objective.name}' trains a {type(objective.module).__name__}: drop "
                "train.eval_prompts"
            )
        options = dict(c.eval_generation or {})
        options.pop("decode_images", None)
        options.setdefault("max_new_tokens", 64)
        decoding = {"seed": 0, **dict(options.pop("decoding", None) or {})}
        if self.prompts:
            from metamorph_core.generation import GenerationConfig
            from metamorph_core.generation.config import check_options

            try:
                check_options(options)
                GenerationConfig(**options, decoding=decoding)
            except (TypeError, ValueError) as e:
                raise ValueError(f"recipe key 'train.eval_generation': {e}") from e
        self.text_options, self.image_options = options, {**options, "decoding": decoding}

    def due(self, step: int) -> bool:
        every = self.config.eval_every
        return every > 0 and step % every == 0

    # -- the run ---------------------------------------------------------------------------
    def run(self, step: int, trainer: Any, loggers: Any) -> str | None:
        """Validate after ``step`` (every rank calls it); rank 0 logs through ``loggers``,
        writes ``output_dir/eval/step-N/`` and returns a one-line report (other ranks:
        ``None``)."""
        began = time.perf_counter()
        budget = float(self.config.eval_budget_s)
        deadline = began + budget if budget > 0 else None
        generate = bool(self.prompts) and trainer.strategy != "fsdp"
        with isolated(self.objective.module):
            metrics, stopped = self._score(trainer, deadline)
            samples: list[dict[str, Any]] = []
            images: list[Any] = []
            if generate and trainer.rank == 0 and not stopped:
                stopped = self._generate(samples, images, deadline)
        if trainer.rank != 0:
            return None
        planned = len(self.prompts) if generate else 0
        metrics.update(
            prompts=len(samples),
            prompts_planned=planned,
            seconds=time.perf_counter() - began,
            budget_exceeded=int(stopped),
        )
        self._record(step, metrics, samples, images, loggers)
        return self._describe(
            step, metrics, budget, images, skipped=bool(self.prompts) and not generate
        )

    def _out_of_time(self, deadline: float | None, world: int) -> bool:
        if deadline is None:
            return False
        flag = torch.tensor([1.0 if time.perf_counter() > deadline else 0.0])
        if world > 1:  # every rank stops at the same batch (FSDP forwards are collective)
            distributed.all_reduce_sum(flag)
        return bool(flag.item() > 0)

    def _score(self, trainer: Any, deadline: float | None) -> tuple[dict[str, float], bool]:
        obj, c = self.objective, self.config
        call = trainer.forward_model if trainer.strategy == "fsdp" else trainer.model
        rank, world = trainer.rank, trainer.world
        size = c.batch_size * world
        metrics: dict[str, float] = {}
        done_all = planned_all = 0
        stopped = False
        device = obj.device().type
        for name in sorted(self.datasets):
            data = self.datasets[name]
            batches = math.ceil(len(data) / size)
            batches = min(batches, c.eval_batches) if c.eval_batches else batches
            planned_all += batches
            sums = torch.zeros(len(obj.terms), dtype=torch.float64)
            counts = torch.zeros(len(obj.terms), dtype=torch.float64)
            done = 0
            for b in range(batches):
                if stopped or self._out_of_time(deadline, world):
                    stopped = True
                    break
                items = [data[i] for i in range(b * size, min((b + 1) * size, len(data)))]
                items = [x for x in items if x is not None]  # skipped bad records
                if not items:
                    continue
                share, weight = items[rank::world], 1.0
                if not share:  # a short last batch: this rank still runs a forward
                    share, weight = items[:1], 0.0
                seed = ((c.seed * 1_000_003 + 7_777_777 + b) * 4099 + rank) % (2**63)
                batch = obj.eval_batch(share, seed)
                with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=c.bf16):
                    parts = obj.loss_sums(call, batch)
                sums += weight * torch.tensor([p.item() for p in parts], dtype=torch.float64)
                counts += weight * torch.tensor(obj.counts(batch), dtype=torch.float64)
                done += 1
            distributed.all_reduce_sum(sums)
            distributed.all_reduce_sum(counts)
            done_all += done
            if done == 0:
                continue
            for term, unit, s, n in zip(
                obj.terms, obj.units, sums.tolist(), counts.tolist(), strict=True
            ):
                metrics[f"{name}/{term}_loss"] = s / max(n, 1.0)
                metrics[f"{name}/{term}_{unit}"] = int(n)
            metrics[f"{name}/batches"] = done
        metrics.update(batches=done_all, batches_planned=planned_all)
        return metrics, stopped

    def _generate(
        self, samples: list[dict[str, Any]], images: list[Any], deadline: float | None
    ) -> bool:
        """Answer, then draw, each prompt until the deadline; True when it stopped early."""
        model = self.objective.module
        for prompt in self.prompts:
            if self._out_of_time(deadline, 1):
                return True
            (r,) = model.generate(prompt, **self.text_options)
            samples.append({"prompt": prompt, "text": r.text, "finish_reason": r.finish_reason})
        if getattr(model, "decoder", None) is None:
            return False
        for sample in samples:
            if self._out_of_time(deadline, 1):
                return True
            (r,) = model.generate_image(sample["prompt"], decode_images=True, **self.image_options)
            sample["image"] = len(images)
            images.append(r.pil_images[0])
        return False

    # -- reporting -------------------------------------------------------------------------
    def _record(
        self,
        step: int,
        metrics: dict[str, float],
        samples: list[dict[str, Any]],
        images: list[Any],
        loggers: Any,
    ) -> None:
        where = self.out / "eval" / f"step-{step:07d}"
        where.mkdir(parents=True, exist_ok=True)
        (where / "metrics.json").write_text(json.dumps({"step": step, **metrics}, indent=2) + "\n")
        if loggers:
            loggers.log_metrics(step, metrics, "eval")
        if samples:
            (where / "samples.json").write_text(json.dumps(samples, indent=2) + "\n")
            text = "\n\n".join(f"**{s['prompt']}**\n\n{s['text']}" for s in samples)
            if loggers:
                loggers.log_text(step, "eval/samples", text)
        if images:
            grid = image_grid(images)
            grid.save(where / "images.png")
            if loggers:
                loggers.log_images(step, "eval/images", [grid])

    def _describe(
        self, step: int, m: dict[str, float], budget: float, images: list[Any], skipped: bool
    ) -> str:
        parts = []
        for name in sorted(self.datasets):
            losses = "  ".join(
                f"{t} {m[f'{name}/{t}_loss']:.4f}"
                for t in self.objective.terms
                if f"{name}/{t}_loss" in m
            )
            if losses:
                parts.append(f"{name}: {losses}")
        if self.prompts:
            if skipped:
                parts.append("prompts skipped under FSDP")
            else:
                parts.append(f"{m['prompts']} prompt(s) answered, {len(images)} image(s)")
        line = f"eval at step {step}: {'; '.join(parts) or 'nothing done'} ({m['seconds']:.1f} s)"
        if m["budget_exceeded"]:
            line += (
                f"; time budget train.eval_budget_s={budget:g} s exceeded: stopped after "
                f"{m['batches']} of {m['batches_planned']} batches and {m['prompts']} of "
                f"{m['prompts_planned']} prompts"
            )
        return line
