"""An exponential moving average of the trained weights (``train.ema_decay``), the weights
diffusion models are commonly sampled from.

After every optimiser step each average moves towards its parameter,
``average += (1 - d) * (parameter - average)``, with ``d = min(ema_decay, (1 + n) / (10 + n))``
after ``n`` steps: early on, while the weights change fast, the average follows them closely,
later it spans about ``1 / (1 - ema_decay)`` steps. The averages are kept in fp32 beside the
parameters, saved in every checkpoint (``ema.safetensors``) and restored on resume, and the
run's ``final`` model (and ``metamorph export`` of a checkpoint) holds the averaged weights.
"""

from __future__ import annotations

import torch


def ema_rate(decay: float, updates: int) -> float:
    """The decay applied at the ``updates``-th average update (1 for the first)."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


class WeightAverage:
    """The moving averages of ``params`` (name -> parameter), fp32, on the parameters'
    devices; the first update starts from the parameters as they are."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(
                f"train.ema_decay must be between 0 and 1 (e.g. 0.999), got {decay!r}; "
                "0 turns the average off"
            )
        self.decay = decay
        self.params = params
        self.names = sorted(params)
        with torch.no_grad():
            self.average = {n: params[n].detach().float().clone() for n in self.names}
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """One step of the averages towards the parameters' current values."""
        self.updates += 1
        weight = 1.0 - ema_rate(self.decay, self.updates)
        averages = [self.average[n] for n in self.names]
        current = [self.params[n].detach().float() for n in self.names]
        torch._foreach_lerp_(averages, current, weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averages, plus their update count as a one-element tensor (``ema::updates``)."""
        return {**self.average, "ema::updates": torch.tensor([self.updates], dtype=torch.int64)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        missing = set(self.names) - set(tensors)
        if missing or "ema::updates" not in tensors:
            raise ValueError(
                f"the weight averages in '{where}' lack {sorted(missing)[:5] or ['ema::updates']}; "
                "resume with the recipe that wrote them"
            )
        with torch.no_grad():
            for n in self.names:
                self.average[n].copy_(tensors[n])
        self.updates = int(tensors["ema::updates"].item())

    @torch.no_grad()
    def copy_to_params(self) -> None:
        """Replace the parameters' values with their averages (in the parameters' dtype)."""
        for n in self.names:
            self.params[n].copy_(self.average[n])


__all__ = ["WeightAverage", "ema_rate"]
