"""DINOv2 through transformers, built on metamorph-encoders' ``HFVisionEncoder``.

Everything an encoder must do (layer choice, class-token dropping, grid reduction to
``num_tokens``, L2 normalisation, freezing, preprocessing from the checkpoint's image processor,
saving into a unified model's checkpoint) comes from the base class; a family declares only
what differs.
"""

from typing import Any

from metamorph_encoders.hf import HFVisionEncoder


class Dinov2Encoder(HFVisionEncoder):
    family = "dinov2"
    model_class = "Dinov2Model"
    config_class = "Dinov2Config"
    default_layer = -1  # the last block's output, before DINOv2's final layernorm
    fixed_resolution = False  # DINOv2 interpolates its position embeddings (518 -> 224 crops)
    default_mean = (0.485, 0.456, 0.406)  # ImageNet, when a checkpoint has no image processor
    default_std = (0.229, 0.224, 0.225)

    def _num_prefix_tokens(self, cfg: Any) -> int:
        if getattr(cfg, "num_register_tokens", 0) or cfg.model_type != "dinov2":
            raise ValueError(
                f"encoder 'dinov2' reads plain DINOv2 checkpoints; this one is "
                f"'{cfg.model_type}' (register tokens need Dinov2WithRegistersModel)"
            )
        return 1  # the class token
