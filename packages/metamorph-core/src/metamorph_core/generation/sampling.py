"""Choosing the next text token from logits: greedy, or sampling with temperature, top-k and
top-p, each row drawing from its own seeded generator (so a sample's draws do not depend on
the other rows of its batch)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def make_generators(
    seed: int | None, rows: int, device: torch.device
) -> list[torch.Generator | None]:
    """Row ``i`` draws from a generator seeded with ``seed + i``; ``None``: torch's global RNG."""
    if seed is None:
        return [None] * rows
    return [torch.Generator(device=device).manual_seed(seed + i) for i in range(rows)]


def filter_logits(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """``(r, v)`` logits -> float32 logits scaled by ``1 / temperature`` with every token outside
    the ``top_k`` most likely (``0``: all) and outside the smallest set whose probability reaches
    ``top_p`` set to ``-inf``. The most likely token always survives."""
    x = logits.float() / temperature
    if 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = sorted_x.softmax(dim=-1)
        beyond = probs.cumsum(dim=-1) - probs > top_p  # mass before this token already reaches p
        x = x.masked_fill(beyond.scatter(-1, order, beyond), float("-inf"))
    return x


def choose_tokens(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generators: Sequence[torch.Generator | None] = (),
) -> torch.Tensor:
    """``(r, v)`` logits -> ``(r,)`` token ids. Greedy takes the argmax; sampling draws row
    ``i`` with ``generators[i]``."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.cat(
        [torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators, strict=True)]
    )
