"""Feature maps as tokens, for encoders that read a model whose stages are spatial maps (CNNs
and other non-ViT models): ``layer`` picks a stage (1-based, ``-1`` the last, ``-2`` the one
before); the stage's ``(b, c, h, w)`` map, measured once with a blank image, gives
``hidden_size = c`` and an ``h x w`` grid that is flattened row by row into ``h*w`` tokens."""

from __future__ import annotations

from collections.abc import Callable

import torch


def map_stage(
    layer: int, num_stages: int, *, drop_prefix_tokens: bool, name: str, model_name: str
) -> int:
    """The 0-based stage that ``layer`` names, or a ``ValueError`` saying the valid range."""
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
    return layer - 1 if layer > 0 else num_stages + layer


def probe_map(
    read: Callable[[torch.Tensor], torch.Tensor],
    model: torch.nn.Module,
    size: tuple[int, int],
    *,
    stage: int,
    name: str,
    model_name: str,
) -> torch.Tensor:
    """``read`` (pixels -> the map of 0-based ``stage``) applied to one blank ``size`` image
    with ``model`` in eval mode: ``(1, c, h, w)``, or a ``ValueError`` naming the model."""
    was_training = model.training
    param = next(model.parameters())
    model.eval()
    try:
        with torch.no_grad():
            out = read(torch.zeros(1, 3, *size, dtype=param.dtype, device=param.device))
    except Exception as e:  # noqa: BLE001 - any failure means: no map to read
        raise ValueError(
            f"encoder '{name}': '{model_name}' gave no (b, c, h, w) feature map at stage "
            f"{stage + 1} for {size[0]}x{size[1]} images ({type(e).__name__}: {e}); "
            "this encoder needs a ViT or a model whose forward_intermediates yields spatial "
            "maps; pick another model, layer or input size"
        ) from e
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"encoder '{name}': '{model_name}' gives {got} at stage {stage + 1}, not "
            "a (b, c, h, w) feature map; this encoder needs a ViT or a model whose "
            "forward_intermediates yields spatial maps; pick another model"
        )
    return out


def map_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """``(b, c, h, w)`` -> ``(b, h*w, c)``, row by row."""
    return feature_map.flatten(2).transpose(1, 2)
