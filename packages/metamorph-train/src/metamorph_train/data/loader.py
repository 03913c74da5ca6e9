"""The training loader: draws in the main process, reads and preprocesses in workers.

The main process runs :class:`Plan`, the batch sampler: the mixture's draws in order as
*described* items (``Mixture.next(described=True)``: records, or conversations whose images
are still names or carried bytes; :meth:`RecordDataset.describe
<metamorph_train.data.RecordDataset.describe>`), the objective's
random choices per item (prompt dropout) from the mixture's generator, the global batch of
every rank drawn and this rank's share kept. Each micro-batch's share goes to a worker of
torchdata's :class:`~torchdata.stateful_dataloader.StatefulDataLoader`, which reads its images
(or cached features), applies the objective's :meth:`item_transform
<metamorph_train.objectives.Objective.item_transform>` (the encoder's preprocessing) and sends
it back, pinned when training on a GPU, ``prefetch`` micro-batches ahead per worker.

What a step sees therefore depends on the seed and the recipe, never on the number of workers
(workers hold no position of their own). The loader's state is the StatefulDataLoader's (it
snapshots the plan's position, mixture generator and per-source positions and stream offsets,
at every micro-batch it hands out); a checkpoint saves it, and resuming continues with exactly
the next micro-batch, with the same number of workers or with another.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any

import torch

from metamorph_train.data.dataset import SKIPPABLE, RecordDataset
from metamorph_train.data.mixture import Mixture


@dataclass
class Draw:
    """One micro-batch as the plan drew it: this rank's ``(source, described item)`` pairs and
    how many drawn records were skipped (counted by the dataset) before they were filled."""

    items: list[tuple[str, Any]]
    skipped: int = 0


@dataclass
class Loaded:
    """One micro-batch read: the items in drawn order, the records skipped by the draw and
    the sources of those whose images failed to read (skipped with ``on_error: skip``)."""

    items: list[Any]
    skipped: int = 0
    bad: list[str] = field(default_factory=list)

    def pin_memory(self) -> Loaded:
        """The items with every tensor in page-locked memory (DataLoader's pin thread calls
        this), so the step's copy to the GPU is a direct one."""
        return replace(self, items=[_pinned(x) for x in self.items])


def _pinned(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.pin_memory()
    if isinstance(value, (list, tuple)):
        return type(value)(_pinned(v) for v in value)
    if isinstance(value, dict):  # an encoder's preprocessed fields
        return {k: _pinned(v) for k, v in value.items()}
    if is_dataclass(value) and not isinstance(value, type):
        return replace(value, **{f.name: _pinned(getattr(value, f.name)) for f in fields(value)})
    return value


class Plan:
    """The batch sampler: every next micro-batch's share for this rank, drawn from a mixture
    of described items. Every rank draws the same global batch (``per_rank * world`` items
    that are not skipped) and keeps ``items[rank::world]``, so N processes see what one
    process with N times the batch sees. Its state is the mixture's."""

    def __init__(
        self,
        mixture: Mixture,
        prepare: Callable[[Any, torch.Generator], Any],
        per_rank: int,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.mixture, self.prepare = mixture, prepare
        self.per_rank, self.rank, self.world = per_rank, rank, world

    def __iter__(self) -> Plan:
        return self

    def __next__(self) -> Draw:
        drawn: list[tuple[str, Any]] = []
        skipped = 0
        while len(drawn) < self.per_rank * self.world:
            name, item = self.mixture.next(described=True)
            if item is None:  # a record the dataset skipped and counted
                skipped += 1
                continue
            # random choices come from the mixture's generator: identical on every rank and
            # saved with the data position
            drawn.append((name, self.prepare(item, self.mixture.gen)))
        return Draw(drawn[self.rank :: self.world], skipped)

    def state_dict(self) -> dict[str, Any]:
        return self.mixture.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mixture.load_state_dict(state)


class Fetch(torch.utils.data.Dataset):
    """What a worker runs on a :class:`Draw`: each described item materialised by its dataset
    (images read) and passed through ``transform``. Items of datasets that are not record
    datasets came whole from the draw and only go through ``transform``."""

    def __init__(
        self, datasets: dict[str, Any], transform: Callable[[Any], Any] | None = None
    ) -> None:
        self.datasets, self.transform = datasets, transform

    def __getitems__(self, draw: Draw) -> Loaded:
        items, bad = [], []
        for name, described in draw.items:
            dataset = self.datasets[name]
            try:
                item = (
                    dataset.materialise(described)
                    if isinstance(dataset, RecordDataset)
                    else described
                )
                items.append(item if self.transform is None else self.transform(item))
            except SKIPPABLE:
                if getattr(dataset, "on_error", "raise") == "raise":
                    raise
                bad.append(name)  # counted by the main process's dataset
        return Loaded(items, draw.skipped, bad)

    def __getitem__(self, index: Any) -> Any:
        raise TypeError("Fetch serves whole draws (__getitems__), not single indices")


def _as_is(batch: Loaded) -> Loaded:
    return batch


class Loader:
    """This rank's micro-batches of ``mixture`` for ``objective``: :meth:`next` gives the next
    one's items (read, transformed, skipped ones left out). ``num_workers`` 0 reads in this
    process; more read in that many worker processes, ``prefetch`` micro-batches ahead each.
    ``pin_memory`` (default: when the objective trains on a GPU) pins what workers send."""

    def __init__(
        self,
        mixture: Mixture,
        objective: Any,
        per_rank: int,
        rank: int = 0,
        world: int = 1,
        num_workers: int = 0,
        prefetch: int = 2,
        pin_memory: bool | None = None,
    ) -> None:
        from torchdata.stateful_dataloader import StatefulDataLoader

        if num_workers < 0:
            raise ValueError(
                f"data.num_workers must be >= 0 (0: read in this process), got {num_workers}"
            )
        if prefetch < 1:
            raise ValueError(
                f"data.prefetch must be >= 1 (micro-batches per worker), got {prefetch}"
            )
        self.mixture, self.num_workers = mixture, num_workers
        self.plan = Plan(mixture, objective.prepare_item, per_rank, rank, world)
        if pin_memory is None:
            pin_memory = objective.device().type == "cuda"
        with warnings.catch_warnings():  # torchdata 0.11 calls a deprecated torch API
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            self.loader = StatefulDataLoader(
                Fetch(mixture.datasets, objective.item_transform()),
                batch_sampler=self.plan,
                num_workers=num_workers,
                collate_fn=_as_is,
                pin_memory=pin_memory,
                prefetch_factor=prefetch if num_workers else None,
                # a snapshot of the plan at every micro-batch: resuming never re-reads one
                snapshot_every_n_steps=1,
            )
        self._batches: Any = None
        self.skipped = 0  # records and items skipped (with on_error: skip) so far

    def next(self) -> list[Any]:
        """This rank's items of the next micro-batch (those skipped are counted, not given)."""
        if self._batches is None:
            self._batches = iter(self.loader)
        loaded = next(self._batches)
        for name in loaded.bad:
            self.mixture.datasets[name].errors.add("bad_images")
        self.skipped += loaded.skipped + len(loaded.bad)
        return loaded.items

    def close(self) -> None:
        """Stop the worker processes (a later :meth:`next` starts them again)."""
        self._batches = None

    def state_dict(self) -> dict[str, Any]:
        """The position after the last micro-batch :meth:`next` gave (JSON-serialisable)."""
        state = self.loader.state_dict()
        return {
            "num_workers": self.num_workers,
            "loader": state,
            "plan": _plan_state(state, self.plan),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: with the number of workers it was saved with through the
        StatefulDataLoader's own state, with another from the plan's position (workers hold
        none). A mixture state (checkpoints written before the loader) is the plan's."""
        if self._batches is not None:
            raise RuntimeError("load the loader's state before drawing from it")
        if "loader" not in state:
            self.plan.load_state_dict(state)
        elif state["num_workers"] == self.num_workers:
            self.loader.load_state_dict(state["loader"])
        else:
            self.plan.load_state_dict(state["plan"])


def _plan_state(loader_state: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """The plan's position inside a StatefulDataLoader state (torchdata 0.11's layout: the
    sampler's state at top level with no workers, in the last snapshot's main state with
    workers; a snapshot is taken at every micro-batch, so none are pending)."""
    key = "_sampler_iter_state"
    if "_snapshot" in loader_state:
        if loader_state.get("_steps_since_snapshot", 0):
            raise RuntimeError("the data loader's snapshot is behind its position")
        loader_state = loader_state["_snapshot"]["_main_snapshot"]
    if key not in loader_state:
        raise RuntimeError(
            "the data loader's state has no sampler position (torchdata's StatefulDataLoader "
            "changed its layout?); pin torchdata to the version in constraints.txt"
        )
    return loader_state[key] if loader_state[key] is not None else plan.state_dict()
