"""What the trainer optimises. An objective owns the trained module, turns the items a
:class:`~metamorph_train.data.Mixture` draws into batches, and batches into loss *sums* and
their *counts* (tokens, images, ...), one pair per loss term, so the trainer can normalise by
the counts of a whole step across micro-batches and ranks (DESIGN.md).

- :class:`VPiTObjective`: a :class:`~metamorph_core.MetaMorphModel` (text + visual loss).
- :class:`DecoderObjective`: a visual decoder learning to draw images from encoder tokens.
- :class:`SiglipObjective`: SigLIP sigmoid-loss pretraining of a small encoder.
- :class:`CausalLMObjective`: text-only causal-LM pretraining of a transformers model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metamorph_core.sequence import IGNORE_INDEX


class Objective:
    """The interface the :class:`~metamorph_train.trainer.Trainer` drives."""

    terms: tuple[str, ...] = ("loss",)  # loss terms, each a sum over ``units``
    units: tuple[str, ...] = ("items",)
    throughput_unit = "items"

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @property
    def weights(self) -> tuple[float, ...]:
        return (1.0,) * len(self.terms)

    def trainable(self, name: str, param: nn.Parameter) -> bool:
        """The default choice of tuned parameters: those requiring grad."""
        return param.requires_grad

    def prepare_item(self, item: Any, generator: torch.Generator) -> Any:
        """A drawn item before batching (random choices from ``generator``, which every rank
        shares and the checkpoint saves)."""
        return item

    def batch(self, items: list[Any], seed: int) -> dict[str, Any]:
        """This rank's items -> keyword arguments of :meth:`loss_sums`; ``seed`` is unique to
        the (step, micro-batch, rank), for objectives that draw noise."""
        raise NotImplementedError

    def counts(self, batch: dict[str, Any]) -> list[float]:
        raise NotImplementedError

    def loss_sums(self, call: Any, batch: dict[str, Any]) -> list[torch.Tensor]:
        """The loss sums of ``batch``; ``call`` is the (DDP/FSDP-wrapped) module."""
        raise NotImplementedError

    def throughput(self, batch: dict[str, Any]) -> int:
        return len(next(iter(batch.values())))

    def shard_units(self) -> list[nn.Module]:
        """Submodules FSDP2 shards on their own (transformer blocks), before the rest."""
        return []

    def enable_gradient_checkpointing(self) -> None:
        raise ValueError(f"{type(self).__name__} does not support gradient checkpointing")

    def save(self, path: Path) -> Path:
        """Write the trained model where users load it from."""
        raise NotImplementedError

    def device(self) -> torch.device:
        return next(self.module.parameters()).device


# -- VPiT ------------------------------------------------------------------------------------
class VPiTObjective(Objective):
    """Visual-predictive instruction tuning of a :class:`~metamorph_core.MetaMorphModel`."""

    terms = ("text", "visual")
    units = ("tokens", "tokens")
    throughput_unit = "tokens"

    def __init__(
        self,
        model: Any,
        pack_to: int | None = None,
        prompt_dropout: float = 0.0,
        visual_input_noise: float = 0.0,
    ) -> None:
        super().__init__(model)
        if not 0.0 <= prompt_dropout <= 1.0:
            raise ValueError(f"prompt_dropout must be in [0, 1], got {prompt_dropout}")
        if not visual_input_noise >= 0.0:
            raise ValueError(f"visual_input_noise must be >= 0 (0: off), got {visual_input_noise}")
        self.pack_to, self.prompt_dropout = pack_to, prompt_dropout
        self.visual_input_noise = visual_input_noise

    @property
    def weights(self) -> tuple[float, ...]:
        c = self.module.config
        return (c.text_loss_weight, c.visual_loss_weight)

    def trainable(self, name: str, param: nn.Parameter) -> bool:
        return param.requires_grad and not name.startswith("decoder.")  # never the decoder

    def prepare_item(self, item: Any, generator: torch.Generator) -> Any:
        p = self.prompt_dropout
        if p > 0 and item.has_target_image and torch.rand(1, generator=generator).item() < p:
            return item.drop_prompt()
        return item

    def batch(self, items: list[Any], seed: int) -> dict[str, Any]:
        out = self.module.prepare_batch(items, pack_to=self.pack_to)
        if self.visual_input_noise > 0:  # drawn from the step's seed: resume stays exact
            out["input_noise"] = (self.visual_input_noise, seed)
        return out

    def counts(self, batch: dict[str, Any]) -> list[float]:
        return [
            float((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
            float(batch["target_slot_mask"].sum()),
        ]

    def loss_sums(self, call: Any, batch: dict[str, Any]) -> list[torch.Tensor]:
        out = call(**batch, return_logits=False)
        return [out.text_loss_sum, out.visual_loss_sum]

    def throughput(self, batch: dict[str, Any]) -> int:
        return int(batch["input_ids"].numel())

    def shard_units(self) -> list[nn.Module]:
        return list(self.module.backbone.causal_lm.base_model.layers)

    def enable_gradient_checkpointing(self) -> None:
        self.module.backbone.causal_lm.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )

    def save(self, path: Path) -> Path:
        return self.module.save_pretrained(path)


# -- visual decoder --------------------------------------------------------------------------
class DecoderLoss(nn.Module):
    """The decoder's diffusion loss as a module (so DDP/FSDP see a forward). The frozen
    encoder, when given, makes the tokens of images that come without cached ones."""

    def __init__(self, decoder: nn.Module, encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.decoder = decoder
        self.encoder = encoder.requires_grad_(False).eval() if encoder is not None else None

    def forward(
        self,
        pixels: torch.Tensor,
        seed: int,
        tokens: torch.Tensor | None = None,
        encoder_pixels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if tokens is None:
            assert self.encoder is not None and encoder_pixels is not None
            with torch.no_grad():
                tokens = self.encoder(encoder_pixels)
        generator = torch.Generator(pixels.device).manual_seed(seed)
        # decoder.loss is a mean over every element; times the batch it is a sum over images
        return self.decoder.loss(tokens, pixels, generator) * pixels.shape[0]

    def train(self, mode: bool = True) -> DecoderLoss:
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()
        return self


class DecoderObjective(Objective):
    """Diffusion-decoder training on encoder tokens (cached, or encoded live by ``encoder``).
    Noise, timesteps and conditioning dropout are drawn from a generator seeded per step,
    micro-batch and rank, so a resumed run draws exactly what an uninterrupted one does."""

    terms = ("diffusion",)
    units = ("images",)
    throughput_unit = "images"

    def __init__(self, decoder: nn.Module, encoder: nn.Module | None = None) -> None:
        super().__init__(DecoderLoss(decoder, encoder))
        if encoder is not None and (
            encoder.num_tokens != decoder.num_tokens or encoder.hidden_size != decoder.token_dim
        ):
            raise ValueError(
                f"encoder gives {encoder.num_tokens} tokens of width {encoder.hidden_size}, "
                f"decoder expects {decoder.num_tokens} of width {decoder.token_dim}"
            )

    def batch(self, items: list[Any], seed: int) -> dict[str, Any]:
        decoder, encoder = self.module.decoder, self.module.encoder
        pixels = [p for item in items for p in item.pixels]
        device = self.device()
        out: dict[str, Any] = {"seed": seed}
        out["pixels"] = torch.stack([_resize(p, decoder.image_size) for p in pixels]).to(device)
        if all(item.tokens is not None for item in items):
            out["tokens"] = torch.stack([t for item in items for t in item.tokens]).to(device)
        elif encoder is None:
            raise ValueError(
                "decoder training needs encoder tokens: give model.encoder (tokens are "
                "computed live) or data.feature_cache"
            )
        else:
            out["encoder_pixels"] = encoder.preprocess(pixels).to(device)
        return out

    def counts(self, batch: dict[str, Any]) -> list[float]:
        return [float(batch["pixels"].shape[0])]

    def loss_sums(self, call: Any, batch: dict[str, Any]) -> list[torch.Tensor]:
        return [call(**batch)]

    def throughput(self, batch: dict[str, Any]) -> int:
        return int(batch["pixels"].shape[0])

    def enable_gradient_checkpointing(self) -> None:
        self.module.decoder.unet.enable_gradient_checkpointing()

    def save(self, path: Path) -> Path:
        self.module.decoder.save_pretrained(path)
        return path


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(
        image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False
    )[0].clamp(0, 1)


# -- encoder pretraining ---------------------------------------------------------------------
class SiglipObjective(Objective):
    """SigLIP sigmoid-loss pretraining (:mod:`metamorph_encoders.pretrain`). The loss is
    contrastive within each rank's micro-batch; the step's loss is the mean over micro-batches
    and ranks."""

    terms = ("sigmoid",)
    units = ("batches",)
    throughput_unit = "pairs"

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        from metamorph_encoders.pretrain import siglip_transform

        super().__init__(model)
        self.tokenizer = tokenizer
        self.transform = siglip_transform(model.config)

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
            "pixel_values": self.transform(list(images)).to(device),
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

    def enable_gradient_checkpointing(self) -> None:
        self.module.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )

    def save(self, path: Path) -> Path:
        from metamorph_encoders.pretrain import save_siglip

        return save_siglip(self.module, self.tokenizer, path)


# -- language-model pretraining ---------------------------------------------------------------
class CausalLMObjective(Objective):
    """Next-token prediction on text; each text ends with the tokenizer's EOS token and is cut
    to ``max_length`` tokens."""

    terms = ("text",)
    units = ("tokens",)
    throughput_unit = "tokens"

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int) -> None:
        super().__init__(model)
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("language-model pretraining needs a tokenizer with EOS and pad tokens")
        self.tokenizer, self.max_length = tokenizer, max_length

    def batch(self, items: list[str], seed: int) -> dict[str, Any]:
        tok = self.tokenizer
        rows = []
        for text in items:
            ids = tok(text, add_special_tokens=True)["input_ids"][: self.max_length - 1]
            rows.append([*ids, tok.eos_token_id])
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
        device = self.device()
        return {
            "input_ids": input_ids.to(device),
            "attention_mask": mask.to(device),
            "labels": labels.to(device),
        }

    def counts(self, batch: dict[str, Any]) -> list[float]:
        return [float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())]

    def loss_sums(self, call: Any, batch: dict[str, Any]) -> list[torch.Tensor]:
        logits = call(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        return [
            F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                labels.flatten(),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
        ]

    def throughput(self, batch: dict[str, Any]) -> int:
        return int(batch["attention_mask"].sum())

    def shard_units(self) -> list[nn.Module]:
        return list(self.module.base_model.layers)

    def enable_gradient_checkpointing(self) -> None:
        self.module.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )

    def save(self, path: Path) -> Path:
        from metamorph_core.checkpoint import atomic_directory

        with atomic_directory(Path(path), self.module.config.model_type) as tmp:
            self.module.save_pretrained(str(tmp))
            self.tokenizer.save_pretrained(str(tmp))
        return Path(path)
