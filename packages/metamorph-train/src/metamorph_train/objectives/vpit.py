"""``vpit``: visual-predictive instruction tuning of a :class:`~metamorph_core.MetaMorphModel`
(text cross-entropy + the visual loss on generated images' tokens).

Recipe section::

    objective:
      name: vpit
      policy: full            # which parameters train: full | projector | lora (POLICIES):
                              # projector = the projector + the image tokens' embedding rows
      lora: {r: 16, alpha: 32}   # policy lora: HFCausalLM.apply_lora options, and
                              # quantize: nf4 for QLoRA (the base's linear weights in 4 bits)
      init_from: null         # a MetaMorph checkpoint to start from (e.g. stage 1's final);
                              # model: then holds only settings to change (loss weights ...)
      pack_to: null           # pack samples into rows of this many tokens
      prompt_dropout: 0.0     # share of generation samples trained with the prompt dropped
      visual_input_noise: 0.0 # noise on the target images' tokens the LLM reads
      loss_chunk: null        # labelled positions per chunk of the vocabulary projection and
                              # cross-entropy, logits recomputed in backward (memory only)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from metamorph_core.components.hf_causal_lm import QUANTIZE
from metamorph_core.conversation import Conversation, ImageFeatures, PixelValues
from metamorph_core.pixels import Pixels, split_pixels
from metamorph_core.sequence import IGNORE_INDEX
from metamorph_train.data import ConversationDataset
from metamorph_train.objectives.base import Objective, checkpoint_transformers

if TYPE_CHECKING:  # pragma: no cover
    from metamorph_train.cache import FeatureCache
    from metamorph_train.recipe import Recipe

logger = logging.getLogger("metamorph")


@dataclass(frozen=True)
class PreprocessImages:
    """A conversation's read images through the encoder's ``preprocess``, as
    :class:`~metamorph_core.conversation.PixelValues` (run in the loader's workers); cached
    features stay as they are."""

    preprocess: Callable[[Any], Pixels]

    def __call__(self, conversation: Conversation) -> Conversation:
        images = [
            x
            if isinstance(x, (ImageFeatures, PixelValues))
            else PixelValues(split_pixels(self.preprocess([x]))[0])
            for x in conversation.images
        ]
        return replace(conversation, images=images)


@dataclass(frozen=True)
class Policy:
    """A named choice of the unified model's trained parameters: ``prepare(model)`` readies
    the model once (e.g. gives the image tokens' rows a parameter of their own), then
    ``select(model, name, param)`` says whether a parameter trains."""

    description: str
    select: Callable[[Any, str, nn.Parameter], bool]
    prepare: Callable[[Any], None] = lambda model: None


def _full(model: Any, name: str, param: nn.Parameter) -> bool:
    if name.startswith("decoder."):
        return False
    return not name.startswith("encoder.") or not model.config.freeze_encoder


def _image_token_rows(model: Any) -> None:
    """The paper's stage 1 trains the input embeddings of the image tokens with the projector
    (and stage 2 keeps only those two rows of them): a backbone that can, trains exactly those
    two rows (``train_image_token_rows``)."""
    if hasattr(model.backbone, "train_image_token_rows"):
        model.backbone.train_image_token_rows()
    else:
        logger.warning(
            "backbone '%s' cannot train the image tokens' embedding rows alone; policy "
            "'projector' trains the projector only",
            model.config.backbone.name,
        )


def _lora_applied(model: Any) -> None:
    if not any("lora_" in n for n, _ in model.named_parameters()):
        raise ValueError(
            "policy 'lora' trains LoRA weights, but the model has none; apply them first "
            "(model.apply_lora(...), or the recipe's objective.lora)"
        )


POLICIES: dict[str, Policy] = {
    "full": Policy(
        "everything but a frozen encoder and an attached decoder (the paper's stage 2)", _full
    ),
    "projector": Policy(
        "the input projector and the image tokens' input-embedding rows (the paper's stage 1)",
        lambda model, name, param: name.startswith(("projector.", "backbone.image_token_rows")),
        _image_token_rows,
    ),
    "lora": Policy(
        "the LLM's LoRA weights and image-token rows, the projector and the vision head",
        lambda model, name, param: (
            name.startswith(("projector.", "head."))
            or (name.startswith("backbone.") and param.requires_grad)
        ),
        _lora_applied,
    ),
}


@dataclass
class VPiTOptions:
    """The recipe's ``objective:`` section for ``vpit``."""

    policy: str = "full"
    lora: dict[str, Any] | None = None
    init_from: str | None = None
    pack_to: int | None = None
    prompt_dropout: float = 0.0
    # noise augmentation of the target images' tokens the LLM reads (not of its targets): per
    # image a level uniform in [0, visual_input_noise] (metamorph_core.vision.perturb_tokens)
    visual_input_noise: float = 0.0
    loss_chunk: int | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(
                f"recipe key 'objective.policy' = '{self.policy}' is not a VPiT policy; use one "
                f"of {sorted(POLICIES)}"
            )
        if self.lora and self.policy != "lora":
            raise ValueError(
                f"recipe key 'objective.lora' is set but objective.policy is '{self.policy}'; "
                "set objective.policy: lora or drop objective.lora"
            )
        quantize = (self.lora or {}).get("quantize")
        if quantize is not None and quantize not in QUANTIZE:
            raise ValueError(
                f"recipe key 'objective.lora.quantize' = {quantize!r}: use one of {QUANTIZE} "
                "(QLoRA's 4-bit NF4 base weights) or leave it out"
            )


class VPiTObjective(Objective):
    """Visual-predictive instruction tuning of a :class:`~metamorph_core.MetaMorphModel`:
    text and visual loss, the trained parameters chosen by a named ``policy``."""

    name = "vpit"
    Options = VPiTOptions
    Model = None  # MetaMorphConfig fields (unused with objective.init_from)
    dataset = ConversationDataset
    terms = ("text", "visual")
    units = ("tokens", "tokens")
    throughput_unit = "tokens"

    def __init__(
        self,
        model: Any,
        policy: str = "full",
        pack_to: int | None = None,
        prompt_dropout: float = 0.0,
        visual_input_noise: float = 0.0,
        loss_chunk: int | None = None,
    ) -> None:
        super().__init__(model)
        if policy not in POLICIES:
            raise ValueError(f"unknown VPiT policy '{policy}'; use one of {sorted(POLICIES)}")
        POLICIES[policy].prepare(model)
        if not 0.0 <= prompt_dropout <= 1.0:
            raise ValueError(f"prompt_dropout must be in [0, 1], got {prompt_dropout}")
        if not visual_input_noise >= 0.0:
            raise ValueError(f"visual_input_noise must be >= 0 (0: off), got {visual_input_noise}")
        self.policy, self.pack_to, self.prompt_dropout = policy, pack_to, prompt_dropout
        self.visual_input_noise = visual_input_noise
        if loss_chunk is not None and not (isinstance(loss_chunk, int) and loss_chunk >= 1):
            raise ValueError(f"objective.loss_chunk must be an integer >= 1, got {loss_chunk!r}")
        self.loss_chunk = loss_chunk

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> VPiTObjective:
        from metamorph_core import MetaMorphConfig, MetaMorphModel
        from metamorph_core.config import ComponentSpec

        o: VPiTOptions = recipe.options
        lora = dict(o.lora or {})
        quantize = lora.pop("quantize", None)  # QLoRA: the frozen base weights in 4 bits
        if o.init_from:
            loaded = {"quantize": quantize} if quantize else None
            model = MetaMorphModel.from_pretrained(o.init_from, backbone_kwargs=loaded)
            model.update_config(**recipe.model)  # e.g. stage 2 turns the visual loss on
        else:
            config = MetaMorphConfig.from_dict(dict(recipe.model))
            if quantize:
                spec = config.backbone
                spec = ComponentSpec(spec.name, {**spec.kwargs, "quantize": quantize})
                config = replace(config, backbone=spec)
            model = MetaMorphModel.from_config(config)
        if o.policy == "lora":
            model.apply_lora(**lora)
        return cls(model, o.policy, o.pack_to, o.prompt_dropout, o.visual_input_noise, o.loss_chunk)

    def feature_cache(self, path: str) -> FeatureCache:
        from metamorph_train.cache import FeatureCache

        return FeatureCache(path, self.module.encoder)

    @property
    def weights(self) -> tuple[float, ...]:
        c = self.module.config
        return (c.text_loss_weight, c.visual_loss_weight)

    def trainable(self, name: str, param: nn.Parameter) -> bool:
        return POLICIES[self.policy].select(self.module, name, param)

    def signature(self) -> dict[str, Any]:
        return {
            "objective": self.name,
            "policy": self.policy,
            "pack_to": self.pack_to,
            "prompt_dropout": self.prompt_dropout,
            "visual_input_noise": self.visual_input_noise,
        }

    def prepare_item(self, item: Any, generator: torch.Generator) -> Any:
        p = self.prompt_dropout
        if p > 0 and item.has_target_image and torch.rand(1, generator=generator).item() < p:
            return item.drop_prompt()
        return item

    def item_transform(self) -> Callable[[Any], Any] | None:
        return PreprocessImages(self.module.encoder.preprocess)

    def batch(self, items: list[Any], seed: int) -> dict[str, Any]:
        out = self.module.prepare_batch(items, pack_to=self.pack_to)
        if self.visual_input_noise > 0:  # drawn from the step's seed: resume stays exact
            out["input_noise"] = (self.visual_input_noise, seed)
        return out

    def eval_batch(self, items: list[Any], seed: int) -> dict[str, Any]:
        out = self.batch(items, seed)
        out.pop("input_noise", None)  # validation measures the model, not the regulariser
        return out

    def counts(self, batch: dict[str, Any]) -> list[float]:
        return [
            float((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
            float(batch["target_slot_mask"].sum()),
        ]

    def loss_sums(self, call: Any, batch: dict[str, Any]) -> list[torch.Tensor]:
        out = call(**batch, return_logits=False, loss_chunk=self.loss_chunk)
        return [out.text_loss_sum, out.visual_loss_sum]

    def throughput(self, batch: dict[str, Any]) -> int:
        return int(batch["input_ids"].numel())

    def shard_units(self) -> list[nn.Module]:
        return self.module.backbone.blocks()

    def enable_gradient_checkpointing(self, every: int = 1, offload: bool = False) -> None:
        checkpoint_transformers(self.module.backbone.causal_lm, every, offload)

    def save(self, path: Path) -> Path:
        return self.module.save_pretrained(path)
