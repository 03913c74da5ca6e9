"""The :class:`Objective` interface: what the trainer optimises, and how a recipe builds it.

An objective owns the trained module, turns the items a :class:`~metamorph_train.data.Mixture`
draws into batches, and batches into loss *sums* and their *counts* (tokens, images, ...), one
pair per loss term, so the trainer normalises by the counts of a whole step across
micro-batches and ranks (a mean of per-rank means is wrong when counts differ).

Objectives are plugins of kind ``objective`` (hook ``register_objectives``); a recipe names
one (``objective: vpit``) and the runner builds it with :meth:`Objective.from_recipe`. The
class attributes say what the recipe may hold for it: ``Options`` types the recipe's
``objective:`` section (its keys besides ``name``), ``Model`` its ``model:`` section.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from metamorph_train.cache import FeatureCache
    from metamorph_train.data import RecordDataset
    from metamorph_train.recipe import Recipe


@dataclass
class NoOptions:
    """The ``objective:`` section of an objective without options: its name only."""


def checkpoint_transformers(model: Any, every: int, offload: bool) -> None:
    """Activation checkpointing of a transformers model's layers: every ``every``-th one, the
    activations kept for the recompute in host memory when ``offload``."""
    model.activation_checkpointing_enable(
        {"use_reentrant": False}, every_n_layers=every, offload=offload
    )


class Objective:
    """The interface the :class:`~metamorph_train.trainer.Trainer` drives.

    Recipe side (class level, read before anything is built): ``name``, ``Options``,
    ``Model``, ``dataset`` and :meth:`from_recipe`. Trainer side: ``terms`` (loss terms, each a
    sum over its ``units``), :meth:`batch`, :meth:`counts`, :meth:`loss_sums`,
    :meth:`trainable`, :meth:`save` and the rest below.
    """

    name: ClassVar[str] = ""
    #: dataclass of the recipe's ``objective:`` section (its keys besides ``name``)
    Options: ClassVar[type] = NoOptions
    #: dataclass of the recipe's ``model:`` section; ``None``: a mapping :meth:`from_recipe` checks
    Model: ClassVar[type | None] = None
    #: the :class:`~metamorph_train.data.RecordDataset` class that turns records into items
    dataset: ClassVar[type[RecordDataset]]

    terms: tuple[str, ...] = ("loss",)
    units: tuple[str, ...] = ("items",)
    throughput_unit = "items"

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    # -- recipe side ---------------------------------------------------------------------------
    @classmethod
    def from_recipe(cls, recipe: Recipe) -> Objective:
        """Build the objective a recipe describes (``recipe.options``, ``recipe.model``)."""
        raise NotImplementedError

    def feature_cache(self, path: str) -> FeatureCache:
        """The feature cache at ``path`` opened for this objective (``data.feature_cache``);
        by default there is none: the objective reads pixels."""
        raise ValueError(f"objective '{self.name}' reads pixels; drop data.feature_cache")

    # -- trainer side --------------------------------------------------------------------------
    @property
    def weights(self) -> tuple[float, ...]:
        return (1.0,) * len(self.terms)

    def trainable(self, name: str, param: nn.Parameter) -> bool:
        """Which parameters of :attr:`module` train (default: those requiring grad)."""
        return param.requires_grad

    def prepare_item(self, item: Any, generator: torch.Generator) -> Any:
        """A drawn item before batching (random choices from ``generator``, which every rank
        shares and the checkpoint saves)."""
        return item

    def item_transform(self) -> Callable[[Any], Any] | None:
        """What the data loader's workers apply to each item once its images are read: the
        per-item preprocessing (the encoder's transform), so the main process only collates.
        :meth:`batch` must accept items with and without it. Default: none. Workers are
        forked (Linux), so the callable may refer to the model; it must not use a GPU."""
        return None

    def batch(self, items: list[Any], seed: int) -> dict[str, Any]:
        """This rank's items -> keyword arguments of :meth:`loss_sums`; ``seed`` is unique to
        the (step, micro-batch, rank), for objectives that draw noise."""
        raise NotImplementedError

    def eval_batch(self, items: list[Any], seed: int) -> dict[str, Any]:
        """:meth:`batch` for validation: without training-only perturbations (default: the
        same)."""
        return self.batch(items, seed)

    def counts(self, batch: dict[str, Any]) -> list[float]:
        raise NotImplementedError

    def loss_sums(self, call: Any, batch: dict[str, Any]) -> list[torch.Tensor]:
        """The loss sums of ``batch``; ``call`` is the (DDP/FSDP-wrapped) module."""
        raise NotImplementedError

    def throughput(self, batch: dict[str, Any]) -> int:
        return len(next(iter(batch.values())))

    def shard_units(self) -> list[nn.Module]:
        """Submodules FSDP2 shards on their own (transformer blocks), before the rest."""
        return []

    def enable_gradient_checkpointing(self, every: int = 1, offload: bool = False) -> None:
        """Recompute activations in backward: every ``every``-th block, their saved inputs in
        host memory when ``offload``."""
        raise ValueError(f"{type(self).__name__} does not support gradient checkpointing")

    def signature(self) -> dict[str, Any]:
        """What a resumed run must share with the checkpoint it resumes (options that change
        what is trained or drawn)."""
        return {"objective": self.name}

    def save(self, path: Path) -> Path:
        """Write the trained model where users load it from."""
        raise NotImplementedError

    def device(self) -> torch.device:
        return next(self.module.parameters()).device
