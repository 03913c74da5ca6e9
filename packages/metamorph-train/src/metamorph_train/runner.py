"""Running a recipe: the objective it names is built from the registry, its data mixed, the
trainer run, and the trained model written to ``output_dir/final`` (after the last step; under
FSDP2 read by rank 0 from the last sharded checkpoint, or from gathered full weights with
``train.fsdp_checkpoint: full``) next to the step checkpoints, a unified model with a model
card that describes the run (:mod:`metamorph_train.model_card`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from metamorph_train import checkpointing, distributed
from metamorph_train.data.images import ImageMemory
from metamorph_train.model_card import save_trained
from metamorph_train.recipe import Recipe, objective_class
from metamorph_train.train_state import latest_checkpoint


def build_objective(recipe: Recipe) -> Any:
    """The objective a recipe names, built from it; new weights (projector, head, ...) come
    from ``train.seed``."""
    torch.manual_seed(recipe.train.seed)
    return objective_class(recipe.objective).from_recipe(recipe)


def run_recipe(recipe: Recipe, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Build the objective, data and trainer a recipe names, train, save ``output_dir/final``;
    returns the trainer's summary with ``saved`` (the final directory) and ``skipped`` (bad
    records counted per kind). The resolved recipe goes to ``output_dir/recipe.yaml`` and the
    loggers ``train.loggers`` names; ``data.eval_sources`` are validated every
    ``train.eval_every`` steps."""
    from metamorph_train.data import Mixture
    from metamorph_train.loggers import build_loggers
    from metamorph_train.trainer import Trainer

    t = recipe.train
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    # before the model is built: an unknown logger or a missing extra fails at once
    loggers = build_loggers(t.loggers) if rank == 0 else []
    if t.meta_init and t.strategy == "fsdp" and rank > 0:  # rank 0 alone holds the weights
        with torch.device("meta"):
            objective = build_objective(recipe)
    else:
        objective = build_objective(recipe)
    datasets = _datasets(recipe, objective)
    weights = {name: w for name, (_, w) in datasets.items()}
    mixture = Mixture(
        {name: d for name, (d, _) in datasets.items()}, weights, seed=recipe.data.seed
    )
    trainer = Trainer(
        objective,
        mixture,
        recipe.train,
        log=log,
        eval_data=_eval_datasets(recipe, objective) if t.eval_every else None,
        run_config=recipe.to_dict(),
        loggers=loggers,
        num_workers=recipe.data.num_workers,
        prefetch=recipe.data.prefetch,
    )
    summary = trainer.run()
    final = Path(recipe.train.output_dir) / "final"
    card = {"step": recipe.train.steps, "run_dir": trainer.out, "world": trainer.world}
    newest = latest_checkpoint(trainer.out) if checkpointing.is_sharded(trainer) else None
    if newest is not None:
        # FSDP2 with sharded checkpoints (the last step's is the newest): nothing is gathered;
        # rank 0 builds the model once and reads the trained weights from the shards into it
        if trainer.rank == 0:
            whole = build_objective(recipe)
            checkpointing.load_trained_weights(newest, whole)
            save_trained(whole, recipe, final, **card)
    elif trainer.strategy == "fsdp":
        # every rank takes part in gathering the shards; rank 0 loads them into a new,
        # unsharded copy of the model and saves that
        state = distributed.full_state_dict(trainer.model)
        if trainer.rank == 0:
            whole = build_objective(recipe)
            whole.module.load_state_dict(state)
            save_trained(whole, recipe, final, **card)
    elif trainer.rank == 0:  # DDP replicas are identical; one writer
        save_trained(objective, recipe, final, **card)
    if trainer.world > 1:
        torch.distributed.barrier()
    errors: dict[str, int] = {}
    for d, _ in datasets.values():
        for k, v in d.errors.summary().items():
            errors[k] = errors.get(k, 0) + v
    return {**summary, "saved": str(final), "skipped": errors}


def _datasets(recipe: Recipe, objective: Any) -> dict[str, tuple[Any, float]]:
    cache = (
        objective.feature_cache(recipe.data.feature_cache) if recipe.data.feature_cache else None
    )
    mb = recipe.data.image_memory_mb
    memory = ImageMemory(mb) if mb else None
    out = {}
    for i, s in enumerate(recipe.data.sources):
        name = s.name or f"source{i}"
        if name in out:
            raise ValueError(f"two sources are named '{name}'; give each a distinct name")
        dataset = objective.dataset(
            s.path,
            s.image_root,
            recipe.data.on_error,
            cache,
            streaming=s.streaming,
            format=s.format,
            seed=recipe.data.seed * 7919 + i,
            image_memory=memory,
        )
        out[name] = (dataset, s.weight)
    return out


def _eval_datasets(recipe: Recipe, objective: Any) -> dict[str, Any]:
    """The held-out sources (``data.eval_sources``), read as the training sources are (the
    feature cache included); unnamed ones are called ``eval0``, ``eval1``, ..."""
    named = [
        dataclasses.replace(s, name=s.name or f"eval{i}")
        for i, s in enumerate(recipe.data.eval_sources)
    ]
    if not named:
        return {}
    held = dataclasses.replace(
        recipe, data=dataclasses.replace(recipe.data, sources=named, eval_sources=[])
    )
    return {name: dataset for name, (dataset, _) in _datasets(held, objective).items()}
