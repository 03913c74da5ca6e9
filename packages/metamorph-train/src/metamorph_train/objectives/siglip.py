"""``siglip``: SigLIP sigmoid-loss pretraining of a small encoder (image and text towers) on
``{"image", "caption"}`` records, for domains with no pretrained encoder. Saves a directory
the ``siglip`` encoder loads. The building blocks (config, loss, saving) are in
:mod:`metamorph_encoders.pretrain`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from metamorph_core.conversation import PixelValues
from metamorph_train.data import PairDataset
from metamorph_train.objectives.base import Objective, checkpoint_transformers

if TYPE_CHECKING:  # pragma: no cover
    from metamorph_train.recipe import Recipe


@dataclass
class SiglipModel:
    """The ``model:`` section of a ``siglip`` recipe."""

    config: dict[str, Any] = field(default_factory=dict)  # small_siglip_config() arguments
    tokenizer: str | None = None  # a tokenizer directory; None: train one on the captions
    vocab_size: int = 1000  # of a trained tokenizer
    seed: int = 0


@dataclass(frozen=True)
class PreprocessPair:
    """A pair's read image through the image tower's transform (in the loader's workers)."""

    transform: Callable[[Any], torch.Tensor]

    def __call__(self, pair: tuple[Any, str]) -> tuple[PixelValues, str]:
        image, caption = pair
        return PixelValues(self.transform([image])[0]), caption


def pixel_values(images: Any, transform: Callable[[Any], torch.Tensor]) -> torch.Tensor:
    """``(b, 3, h, w)``: the images through ``transform``, or stacked where the loader's
    workers did that already."""
    if all(isinstance(x, PixelValues) for x in images):
        return torch.stack([x.pixels for x in images])
    return transform(list(images))


class SiglipObjective(Objective):
    """SigLIP sigmoid-loss pretraining. The loss is contrastive within each rank's
    micro-batch; the step's loss is the mean over micro-batches and ranks."""

    name = "siglip"
    Model = SiglipModel
    dataset = PairDataset
    terms = ("sigmoid",)
    units = ("batches",)
    throughput_unit = "pairs"

    def __init__(self, model: torch.nn.Module, tokenizer: Any) -> None:
        from metamorph_encoders.pretrain import siglip_transform

        super().__init__(model)
        self.tokenizer = tokenizer
        self.transform = siglip_transform(model.config)

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> SiglipObjective:
        from metamorph_encoders.pretrain import build_siglip, small_siglip_config
        from metamorph_train.data.records import check_pair_record
        from metamorph_train.tokenizer import source_tokenizer

        m: SiglipModel = recipe.model
        tokenizer = source_tokenizer(
            m.tokenizer,
            Path(recipe.train.output_dir) / "tokenizer",
            recipe.data.sources,
            m.vocab_size,
            check_pair_record,
            lambda r: r["caption"],
        )
        config = small_siglip_config(
            vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **m.config
        )
        return cls(build_siglip(config, seed=m.seed), tokenizer)

    def item_transform(self) -> Callable[[Any], Any] | None:
        return PreprocessPair(self.transform)

    def batch(self, items: list[Any], seed: int) -> dict[str, Any]:
        from metamorph_encoders.pretrain import tokenize_captions

        if len(items) < 2:
            raise ValueError(
                "the sigmoid loss needs at least 2 pairs per rank and micro-batch; raise "
                "train.batch_size"
            )
        images, captions = zip(*items, strict=True)
        length = self.module.config.text_config.max_position_embeddings
        device = self.device()
        return {
            "pixel_values": pixel_values(images, self.transform).to(device),
            "input_ids": tokenize_captions(self.tokenizer, captions, length).to(device),
        }

    def counts(self, batch: dict[str, Any]) -> list[float]:
        return [1.0]

    def loss_sums(self, call: Any, batch: dict[str, Any]) -> list[torch.Tensor]:
        from metamorph_encoders.pretrain import sigmoid_loss

        out = call(**batch)
        return [sigmoid_loss(out.logits_per_text, batch["input_ids"])]

    def throughput(self, batch: dict[str, Any]) -> int:
        return int(batch["input_ids"].shape[0])

    def enable_gradient_checkpointing(self, every: int = 1, offload: bool = False) -> None:
        checkpoint_transformers(self.module, every, offload)

    def save(self, path: Path) -> Path:
        from metamorph_encoders.pretrain import save_siglip

        return save_siglip(self.module, self.tokenizer, path)
