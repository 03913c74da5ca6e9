"""What a trained model's card says about how it was trained
(:class:`~metamorph_core.model_card.ModelCardData`): the recipe's objective and trainer
settings, its data sources, and the last validation's losses when the run validated.

:func:`save_trained` is how a run (``output_dir/final``) and ``metamorph export`` write the
trained model: the card data goes onto a unified model (objectives whose module has
``card_data``) before the objective saves it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from metamorph_core.checkpoint import jsonable

#: the trainer settings a card reports (``train:`` keys of the recipe)
TRAINING_KEYS = (
    "steps",
    "batch_size",
    "grad_accum",
    "lr",
    "schedule",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "bf16",
    "ema_decay",
    "seed",
)


def save_trained(
    objective: Any,
    recipe: Any,
    out: str | Path,
    step: int,
    run_dir: str | Path | None = None,
    world: int | None = None,
) -> Path:
    """``objective.save(out)``, a unified model's card data filled from ``recipe`` first
    (:func:`training_card`); other models are saved as they are."""
    module = objective.module
    if hasattr(module, "card_data"):
        from metamorph_core.model_card import ModelCardData

        card = training_card(recipe, step, run_dir, world)
        module.card_data = dataclasses.replace(ModelCardData.of(module.card_data), **card)
    return objective.save(Path(out))


def training_card(
    recipe: Any, step: int, run_dir: str | Path | None = None, world: int | None = None
) -> dict[str, Any]:
    """The ``training``, ``data`` and ``metrics`` card fields of a run of ``recipe`` trained to
    ``step`` (on ``world`` processes, when known), with the last validation at or before
    ``step`` in ``run_dir/eval/`` when there is one."""
    options = recipe.options
    settings = jsonable(dataclasses.asdict(options)) if dataclasses.is_dataclass(options) else {}
    train = dataclasses.asdict(recipe.train)
    training: dict[str, Any] = {
        "objective": {"name": recipe.objective, **_set(settings)},
        **{key: train[key] for key in TRAINING_KEYS},
        "steps": step,
    }
    if world is not None:
        training["global_batch_size"] = train["batch_size"] * train["grad_accum"] * world
    data = [
        _set({"name": s.name, "path": s.path, "format": s.format, "weight": s.weight})
        for s in recipe.data.sources
    ]
    validation = last_validation(Path(run_dir), step) if run_dir is not None else {}
    return {
        "training": training,
        "data": data,
        "metrics": {"validation": validation} if validation else {},
    }


def last_validation(run_dir: Path, step: int) -> dict[str, Any]:
    """The held-out losses of the newest ``run_dir/eval/step-N/metrics.json`` with N <= step,
    with ``step`` N; ``{}`` when the run did not validate."""
    found = []
    for path in (run_dir / "eval").glob("step-*/metrics.json"):
        n = path.parent.name.removeprefix("step-")
        if n.isdigit() and int(n) <= step:
            found.append((int(n), path))
    if not found:
        return {}
    n, path = max(found)
    metrics = json.loads(path.read_text())
    return {"step": n, **{k: v for k, v in sorted(metrics.items()) if k.endswith("_loss")}}


def _set(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` without the unset ones (``None``, empty)."""
    return {k: v for k, v in values.items() if v is not None and v != {} and v != []}
