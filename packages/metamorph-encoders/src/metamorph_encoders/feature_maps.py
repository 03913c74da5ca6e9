"""Feature maps as tokens, for encoders that read a model whose stages are spatial maps (CNNs
and other non-ViT models): ``layer`` picks a stage (1-based, ``-1`` the last, ``-2`` the one
before); the stage's ``(b, c, h, w)`` map, measured once with a blank image, gives
``hidden_size = c`` and an ``h x w`` grid that is flattened row by row into ``h*w`` tokens."""

from __future__ import annotations

from collections.abc import Callable

import torch

#: ``(model, pixels (b, 3, h, w), 0-based stage)`` -> that stage's ``(b, c, h', w')`` map
StageMap = Callable[[torch.nn.Module, torch.Tensor, int], torch.Tensor]


class StageMaps:
    """Reads the map of the stage ``layer`` names through ``read`` (a plain function: the
    model is passed at each call, so copies of an encoder read their own model). Its
    ``num_layers`` (the stage count), ``hidden_size``, ``grid`` and ``num_prefix_tokens`` (0)
    are what :meth:`~metamorph_encoders.base.GridEncoder._setup` takes; calling it with the
    model and ``(b, 3, h, w)`` pixels gives ``(b, h*w, c)``. ``size``: the input images'."""

    num_prefix_tokens = 0

    def __init__(
        self,
        read: StageMap,
        model: torch.nn.Module,
        layer: int,
        num_stages: int,
        size: tuple[int, int],
        *,
        drop_prefix_tokens: bool,
        name: str,
        model_name: str,
    ) -> None:
        if not drop_prefix_tokens:
            raise ValueError(
                f"encoder '{name}': '{model_name}' is read as feature maps, which carry no "
                "prefix (class/register) tokens; drop_prefix_tokens=False needs a ViT"
            )
        if not 1 <= abs(layer) <= num_stages:
            raise ValueError(
                f"encoder '{name}': layer {layer} is out of range; '{model_name}' has "
                f"{num_stages} feature stages, so layer must be in 1..{num_stages} or "
                f"-{num_stages}..-1 (-1 is the last stage)"
            )
        self.read, self.num_layers = read, num_stages
        self.stage = layer - 1 if layer > 0 else num_stages + layer
        self.hidden_size, *grid = self._probe(model, size, name, model_name).shape[1:]
        self.grid = tuple(grid)

    def __call__(self, model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.read(model, pixel_values, self.stage).flatten(2).transpose(1, 2)

    def _probe(
        self, model: torch.nn.Module, size: tuple[int, int], name: str, model_name: str
    ) -> torch.Tensor:
        """The stage's map for one blank image, with ``model`` in eval mode: ``(1, c, h, w)``."""
        was_training = model.training
        param = next(model.parameters())
        model.eval()
        try:
            with torch.no_grad():
                blank = torch.zeros(1, 3, *size, dtype=param.dtype, device=param.device)
                out = self.read(model, blank, self.stage)
        except Exception as e:  # noqa: BLE001 - any failure means: no map to read
            raise ValueError(
                f"encoder '{name}': '{model_name}' gave no (b, c, h, w) feature map at stage "
                f"{self.stage + 1} for {size[0]}x{size[1]} images ({type(e).__name__}: {e}); "
                "this encoder needs a ViT or a model whose forward_intermediates yields spatial "
                "maps; pick another model, layer or input size"
            ) from e
        finally:
            model.train(was_training)
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"encoder '{name}': '{model_name}' gives {got} at stage {self.stage + 1}, not "
                "a (b, c, h, w) feature map; this encoder needs a ViT or a model whose "
                "forward_intermediates yields spatial maps; pick another model"
            )
        return out
