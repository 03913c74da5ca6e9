"""A weighted mixture of datasets whose position can be saved and restored exactly."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from metamorph_train.data.dataset import RecordDataset


class Mixture:
    """Draws from ``datasets`` with probability proportional to ``weights``.

    Each map-style dataset is read in a shuffled order that depends only on ``seed``, the
    dataset and the epoch; a streaming dataset keeps its own position. So :meth:`state_dict` (JSON-serialisable) and :meth:`load_state_dict` continue the
    exact sequence of draws after a restart.
    """

    def __init__(
        self, datasets: dict[str, Sequence[Any]], weights: dict[str, float], seed: int = 0
    ) -> None:
        if not datasets:
            raise ValueError("a mixture needs at least one dataset")
        if set(weights) != set(datasets):
            raise ValueError(f"weights name {sorted(weights)} but datasets are {sorted(datasets)}")
        # streaming datasets (``next()``/``state_dict()``) keep their own position
        self.streams = {n for n, d in datasets.items() if getattr(d, "streaming", False)}
        for name, data in datasets.items():
            if name not in self.streams and len(data) == 0:
                raise ValueError(f"dataset '{name}' of the mixture is empty")
            if weights[name] < 0:
                raise ValueError(f"dataset '{name}' has a negative weight {weights[name]}")
        self.names = sorted(datasets)
        self.datasets = datasets
        self.probs = torch.tensor([float(weights[n]) for n in self.names], dtype=torch.float64)
        if self.probs.sum() <= 0:
            raise ValueError("mixture weights sum to zero")
        self.seed = seed
        self.gen = torch.Generator().manual_seed(seed)
        self.position = {n: [0, 0] for n in self.names}  # epoch, index within the epoch
        self.steps = 0

    def _order(self, name: str, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(
            self.seed * 1_000_003 + self.names.index(name) * 7919 + epoch
        )
        return torch.randperm(len(self.datasets[name]), generator=g).tolist()

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        while True:
            yield self.next()

    def next(self, described: bool = False) -> tuple[str, Any]:
        """The next ``(dataset name, item)``; ``described``: a record dataset's item as
        :meth:`RecordDataset.describe <metamorph_train.data.RecordDataset.describe>` gives it
        (images unread: the loader's workers read them). The draws are the same either way."""
        name = self.names[int(torch.multinomial(self.probs, 1, generator=self.gen))]
        self.steps += 1
        dataset = self.datasets[name]
        lazy = described and isinstance(dataset, RecordDataset)
        if name in self.streams:
            return name, dataset.next_described() if lazy else dataset.next()
        epoch, index = self.position[name]
        at = self._order(name, epoch)[index]
        item = dataset.describe_at(at) if lazy else dataset[at]
        index += 1
        if index == len(self.datasets[name]):
            epoch, index = epoch + 1, 0
        self.position[name] = [epoch, index]
        return name, item

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "steps": self.steps,
            "rng": self.gen.get_state().tolist(),
            "position": {n: list(p) for n, p in self.position.items()},
            "streams": {n: self.datasets[n].state_dict() for n in sorted(self.streams)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed or set(state["position"]) != set(self.names):
            raise ValueError(
                f"mixture state is for seed {state['seed']} and datasets {sorted(state['position'])}, "
                f"this mixture has seed {self.seed} and {self.names}"
            )
        self.gen.set_state(torch.tensor(state["rng"], dtype=torch.uint8))
        self.position = {n: list(p) for n, p in state["position"].items()}
        for n, stream_state in state.get("streams", {}).items():
            self.datasets[n].load_state_dict(stream_state)
        self.steps = state["steps"]
