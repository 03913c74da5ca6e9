"""Helpers for tests of code that needs a real vision tower: tiny random transformers models
saved with ``save_pretrained`` (nothing downloaded), loadable by this package's encoders."""

from __future__ import annotations

from pathlib import Path

#: a SigLIP 2 vision tower: 4-pixel patches, 8x8 position embeddings, width 32, two blocks
TINY_SIGLIP2 = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "patch_size": 4,
    "num_patches": 64,
}


def save_tiny_siglip2(directory: str | Path, max_num_patches: int = 64, seed: int = 0) -> Path:
    """A random ``Siglip2Model`` (:data:`TINY_SIGLIP2` towers) and its NaFlex image processor
    (``max_num_patches`` patches per image) saved to ``directory``, for
    ``create("encoder", "siglip2", pretrained=directory)``."""
    import torch
    import transformers

    directory = Path(directory)
    text = {**{k: v for k, v in TINY_SIGLIP2.items() if "patch" not in k}, "vocab_size": 50}
    config = transformers.Siglip2Config(vision_config=TINY_SIGLIP2, text_config=text)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Siglip2Model(config).eval()
    model.save_pretrained(directory)
    processor = transformers.Siglip2ImageProcessor(
        patch_size=TINY_SIGLIP2["patch_size"], max_num_patches=max_num_patches
    )
    processor.save_pretrained(directory)
    return directory
