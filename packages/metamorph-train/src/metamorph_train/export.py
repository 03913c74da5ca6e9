"""``metamorph export CKPT OUT [--recipe RECIPE] [key.path=value ...]``: the trained model of a
trainer checkpoint in the format users load (the objective's ``save``; for ``vpit`` a MetaMorph
checkpoint that ``MetaMorphModel.from_pretrained`` reads, its model card describing the run up
to that step: :mod:`metamorph_train.model_card`).

``CKPT`` is a step directory (``output_dir/step-NNNNNNN``) or a run's ``output_dir`` (its
newest complete checkpoint), sharded (FSDP2) or single-file. Checkpoints hold the trained
parameters only, so the recipe rebuilds the model with its frozen weights: by default the run's
``output_dir/recipe.yaml`` (written by ``metamorph train``), else ``--recipe``; dotted overrides
apply to it (e.g. a moved ``model.backbone.kwargs.pretrained``). The model is built once, in
this process, on the CPU; the trained weights are read from the shards slice by slice into it.
The optimizer state is never read; nothing is gathered or unpickled.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from metamorph_core.cli import Run
from metamorph_core.errors import CheckpointError


def configure(parser: argparse.ArgumentParser) -> Run:
    parser.add_argument(
        "checkpoint",
        metavar="CKPT",
        help="a trainer checkpoint (output_dir/step-NNNNNNN) or a run's output_dir (its newest)",
    )
    parser.add_argument("out", metavar="OUT", help="where to write the model")
    parser.add_argument(
        "--recipe",
        metavar="RECIPE",
        help="the recipe that built the model (default: the run's output_dir/recipe.yaml)",
    )
    parser.add_argument("overrides", nargs="*", help="dotted recipe overrides, e.g. a.b=value")
    return run


def run(args: argparse.Namespace) -> int:
    summary = export_checkpoint(args.checkpoint, args.out, args.recipe, args.overrides)
    print(json.dumps(summary, indent=2))
    return 0


def locate(checkpoint: str | Path, recipe: str | Path | None) -> tuple[Path, Path]:
    """The step directory ``checkpoint`` names (itself, or a run directory's newest complete
    checkpoint) and the recipe to rebuild its model: ``recipe``, else the run's
    ``recipe.yaml``."""
    from metamorph_train.train_state import latest_checkpoint

    path = Path(checkpoint)
    if not (path / "config.json").is_file():
        newest = latest_checkpoint(path) if path.is_dir() else None
        if newest is None:
            raise CheckpointError(
                f"'{path}' is neither a trainer checkpoint (a step-NNNNNNN directory with "
                "config.json) nor a run directory holding one; pass output_dir/step-NNNNNNN"
            )
        path = newest
    if recipe is not None:
        return path, Path(recipe)
    found = path.parent / "recipe.yaml"
    if not found.is_file():
        raise FileNotFoundError(
            f"no recipe to rebuild the model of '{path}': '{found}' does not exist (runs write "
            "it when they start); pass the recipe the run was trained with as --recipe RECIPE"
        )
    return path, found


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    recipe: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Write the model of ``checkpoint`` to ``out`` (see the module); returns a summary."""
    from metamorph_train.recipe import load_recipe

    path, recipe_path = locate(checkpoint, recipe)
    return export_step(path, out, load_recipe(recipe_path, overrides))


def export_step(path: Path, out: str | Path, recipe: Any) -> dict[str, Any]:
    """Rebuild ``recipe``'s objective once, load the trained weights of the step directory
    ``path`` into it (:func:`~metamorph_train.checkpointing.load_trained_weights`) and save
    it to ``out``; returns a summary."""
    from metamorph_train.checkpointing import load_trained_weights
    from metamorph_train.model_card import save_trained
    from metamorph_train.runner import build_objective

    objective = build_objective(recipe)
    meta = load_trained_weights(path, objective)
    saved = save_trained(objective, recipe, out, meta["step"], path.parent, meta.get("world"))
    return {
        "checkpoint": str(path),
        "step": meta["step"],
        "layout": meta["layout"],
        "trained_tensors": len(meta["run"]["params"]),
        "weight_averages": meta["averaged"],
        "saved": str(saved),
    }
