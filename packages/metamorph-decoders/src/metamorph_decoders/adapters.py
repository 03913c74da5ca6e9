"""Adapters: visual tokens ``(b, n, c)`` -> a diffusion model's context ``(b, l, d)``.

``mlp`` is the paper's: Linear-LayerNorm-ReLU blocks, the last block Linear-LayerNorm without
ReLU (e.g. 1152 -> 2048 -> 768), applied per token. ``query`` lets ``num_queries`` learned
queries cross-attend to the tokens. The decoder zero-pads the output to its context length.
"""

from __future__ import annotations

import torch
from torch import nn


class Adapter(nn.Module):
    """``in_dim`` token width in, ``out_dim`` context width out, ``out_tokens`` tokens out."""

    in_dim: int
    out_dim: int

    def out_tokens(self, num_tokens: int) -> int:
        return num_tokens


class MLPAdapter(Adapter):
    def __init__(
        self, in_dim: int, out_dim: int, hidden_dims: tuple[int, ...] | list[int] = (2048,)
    ):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        dims = [in_dim, *hidden_dims, out_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers += [nn.Linear(a, b), nn.LayerNorm(b)]
            if i < len(dims) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (b, n, c) -> (b, n, d)
        return self.net(tokens)


class QueryAdapter(Adapter):
    def __init__(self, in_dim: int, out_dim: int, num_queries: int = 32, num_heads: int = 8):
        super().__init__()
        if out_dim % num_heads:
            raise ValueError(
                f"query adapter: out_dim {out_dim} is not divisible by num_heads {num_heads}"
            )
        self.in_dim, self.out_dim, self.num_queries = in_dim, out_dim, num_queries
        self.queries = nn.Parameter(torch.randn(num_queries, out_dim) * out_dim**-0.5)
        self.kv = nn.Linear(in_dim, out_dim)
        self.attn = nn.MultiheadAttention(out_dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(out_dim)

    def out_tokens(self, num_tokens: int) -> int:
        return self.num_queries

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (b, n, c) -> (b, q, d)
        kv = self.kv(tokens)
        q = self.queries.expand(tokens.shape[0], -1, -1).to(kv.dtype)
        out, _ = self.attn(q, kv, kv, need_weights=False)
        return self.norm(out + q)
