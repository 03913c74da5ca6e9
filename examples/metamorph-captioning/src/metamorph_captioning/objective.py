"""``caption``: LLaVA-style alignment on image-caption pairs. Each ``{"image", "caption"}``
record becomes the conversation "<image> + prompt" -> caption, and a unified model learns it
with the text loss alone; by default only its projector trains (``train_projector_only``).

Recipe::

    objective: {name: caption, prompt: "Describe the image briefly."}
    model: {encoder: ..., backbone: ..., template: ...}   # MetaMorphConfig fields
    data: {sources: [{path: pairs.jsonl, image_root: images}]}
    train: {output_dir: runs/caption, steps: 1000}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metamorph_core import Conversation, MetaMorphModel
from metamorph_core.conversation import Turn
from metamorph_core.sequence import IGNORE_INDEX
from metamorph_train.data import PairDataset
from metamorph_train.objectives import Objective


@dataclass
class CaptionOptions:
    """The recipe's ``objective:`` section for ``caption``."""

    prompt: str = "Describe the image briefly."
    train_projector_only: bool = True
    init_from: str | None = None  # a MetaMorph checkpoint to start from


class CaptionObjective(Objective):
    """Text cross-entropy on captions of images read through the model's own encoder."""

    name = "caption"
    Options = CaptionOptions
    Model = None  # MetaMorphConfig fields
    dataset = PairDataset
    terms = ("text",)
    units = ("tokens",)
    throughput_unit = "tokens"

    def __init__(self, model: MetaMorphModel, prompt: str, projector_only: bool = True) -> None:
        super().__init__(model)
        self.prompt, self.projector_only = prompt, projector_only

    @classmethod
    def from_recipe(cls, recipe: Any) -> CaptionObjective:
        o: CaptionOptions = recipe.options
        if o.init_from:
            model = MetaMorphModel.from_pretrained(o.init_from)
        else:
            model = MetaMorphModel.from_config(recipe.model)
        return cls(model, o.prompt, o.train_projector_only)

    def feature_cache(self, path: str) -> Any:
        from metamorph_train.cache import FeatureCache

        return FeatureCache(path, self.module.encoder)

    def trainable(self, name: str, param: torch.nn.Parameter) -> bool:
        if self.projector_only:
            return name.startswith("projector.")
        return not name.startswith(("encoder.", "decoder."))

    def batch(self, items: list[Any], seed: int) -> dict[str, Any]:
        conversations = [
            Conversation(
                [Turn("user", f"<image>\n{self.prompt}"), Turn("assistant", caption)], [image]
            )
            for image, caption in items
        ]
        return self.module.prepare_batch(conversations)

    def counts(self, batch: dict[str, Any]) -> list[float]:
        return [float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())]

    def loss_sums(self, call: Any, batch: dict[str, Any]) -> list[torch.Tensor]:
        return [call(**batch, return_logits=False).text_loss_sum]

    def throughput(self, batch: dict[str, Any]) -> int:
        return int(batch["input_ids"].numel())

    def save(self, path: Path) -> Path:
        return self.module.save_pretrained(path)
