"""CLIP score: how well each generated image matches its prompt, by a CLIP-style model the
user has locally (a transformers CLIP or SigLIP checkpoint directory).

For an image ``x`` and its prompt ``t``: ``100 * max(cos(E_img(x), E_txt(t)), 0)``, with
``E_img`` / ``E_txt`` the model's projected image and text embeddings
(``get_image_features`` / ``get_text_features``); the score of a set is the mean, with the
normal-approximation interval of :func:`metamorph_eval.stats.mean` over the per-image values.
This is torchmetrics' ``CLIPScore`` definition; no logit scale or bias enters (for SigLIP
too). Prompts longer than the text tower's context are truncated, as CLIP's tokenizer does.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class ClipScorer:
    """Per-image CLIP scores with the model in ``path`` (loaded with ``AutoModel``,
    ``AutoTokenizer`` and ``AutoImageProcessor`` from that directory only; nothing is
    downloaded, no remote code runs)."""

    def __init__(self, path: str | Path, device: str = "cpu", dtype: str | None = None) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        root = Path(path)
        if not (root / "config.json").is_file():
            raise FileNotFoundError(
                f"--clip '{root}' is not a transformers checkpoint directory (no config.json); "
                "pass a local CLIP or SigLIP directory (AutoModel.from_pretrained loads it)"
            )
        options: dict[str, Any] = {"local_files_only": True}
        kwargs = {**options, **({"dtype": getattr(torch, dtype)} if dtype else {})}
        model = AutoModel.from_pretrained(str(root), **kwargs)
        missing = [m for m in ("get_image_features", "get_text_features") if not hasattr(model, m)]
        if missing:
            raise ValueError(
                f"--clip '{root}' holds a {type(model).__name__}, which has no "
                f"{' or '.join(missing)}; pass a CLIP-style (image and text tower) checkpoint"
            )
        self.model = model.to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(root), **options)
        self.image_processor = AutoImageProcessor.from_pretrained(str(root), **options)
        self.device = device
        text_config = getattr(model.config, "text_config", model.config)
        limits = [
            getattr(text_config, "max_position_embeddings", None),
            getattr(self.tokenizer, "model_max_length", None),
        ]
        self.max_length = min(int(v) for v in limits if v and v < 1_000_000)
        # SigLIP was trained on texts padded to the full length, CLIP on unpadded ones
        self.padding = "max_length" if "siglip" in model.config.model_type else True
        self.identity = {"model": str(root), "type": model.config.model_type}

    def scores(self, images: Sequence[Any], texts: Sequence[str]) -> list[float]:
        """``100 * max(cos, 0)`` of each image (PIL) with the text at the same position."""
        import torch

        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        if not images:
            return []
        tokens = self.tokenizer(
            list(texts),
            padding=self.padding,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        pixels = self.image_processor(images=list(images), return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        with torch.no_grad():
            img = _features(self.model.get_image_features, pixels, self.device, dtype)
            txt = _features(self.model.get_text_features, tokens, self.device, dtype)
            cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
        return [float(v) for v in (100.0 * cos.clamp(min=0)).cpu()]


def _features(method: Any, inputs: Any, device: str, dtype: Any) -> Any:
    """Call ``method`` with the ``inputs`` it accepts (floating ones cast to the model's dtype)
    and return the embeddings: the tensor itself, or an output's ``pooler_output`` (what
    transformers 5 returns)."""
    accepted = inspect.signature(method).parameters
    kwargs = {}
    for name, value in inputs.items():
        if name in accepted:
            value = value.to(device)
            kwargs[name] = value.to(dtype) if value.is_floating_point() else value
    out = method(**kwargs)
    if hasattr(out, "pooler_output"):
        out = out.pooler_output
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return out
