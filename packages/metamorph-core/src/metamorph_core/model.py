"""``MetaMorphModel``: encoder -> projector -> backbone -> (text head, vision head), with the
VPiT losses (docs/method.md).

Alignment: the hidden state at ``t - 1`` predicts the token at ``t``, text and visual alike:
the state at ``<image_start>`` predicts the first visual token and the last visual token's
state predicts ``<image_end>`` through the text head. Visual targets are the detached,
normalised encoder tokens (before the projector) of images in assistant turns; prompt images
are context only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metamorph_core import generation, saving
from metamorph_core.config import ComponentSpec, MetaMorphConfig
from metamorph_core.conversation import Conversation, ImageFeatures, PixelValues
from metamorph_core.decoding import DecodeConfig
from metamorph_core.dtypes import module_dtype
from metamorph_core.errors import ShapeMismatchError
from metamorph_core.generation import GenerationConfig, GenerationEvent, GenerationResult, Prompt
from metamorph_core.interfaces import (
    Backbone,
    Projector,
    VisionEncoder,
    VisionHead,
    VisualDecoder,
    VisualLoss,
)
from metamorph_core.model_card import ModelCardData
from metamorph_core.pixels import Pixels, move_pixels, stack_pixels
from metamorph_core.plugins.registry import create
from metamorph_core.sequence import IGNORE_INDEX, SequenceBuilder, collate, pack
from metamorph_core.vision import perturb_tokens

_KINDS = ("encoder", "projector", "backbone", "head")


@dataclass
class MetaMorphOutput:
    """Losses are token sums over token counts; the sums and counts are kept so that ranks and
    accumulation steps can be reduced exactly (sum the sums, sum the counts, divide)."""

    loss: torch.Tensor
    text_loss: torch.Tensor
    visual_loss: torch.Tensor
    text_loss_sum: torch.Tensor
    text_tokens: torch.Tensor
    visual_loss_sum: torch.Tensor
    visual_tokens: torch.Tensor
    logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None


def _spec_of(component: nn.Module, kind: str) -> ComponentSpec:
    spec = getattr(component, "metamorph_spec", None)
    if spec is None:
        raise ValueError(
            f"the {kind} ({type(component).__name__}) was not created through the registry, so "
            f"the model cannot record how to rebuild it; create it with "
            f"metamorph_core.create('{kind}', name, ...) or pass config="
        )
    return ComponentSpec(spec["name"], dict(spec["kwargs"]))


class MetaMorphModel(nn.Module):
    """A unified model. Build it from components, from a config, or from a checkpoint."""

    def __init__(
        self,
        encoder: VisionEncoder,
        projector: Projector,
        backbone: Backbone,
        head: VisionHead,
        visual_loss: VisualLoss | None = None,
        config: MetaMorphConfig | None = None,
    ) -> None:
        super().__init__()
        self.encoder, self.projector, self.backbone, self.head = encoder, projector, backbone, head
        self.visual_loss_fn = visual_loss if visual_loss is not None else create("loss", "cosine")
        if config is None:
            specs = {k: _spec_of(getattr(self, k), k) for k in _KINDS}
            config = MetaMorphConfig(**specs)
        self.config = config
        self._check_shapes()
        self.decoder: VisualDecoder | None = None
        #: what the model card says beyond the model (training, data, metrics, license); saved
        #: in config.json and README.md, and loaded back (:mod:`metamorph_core.model_card`)
        self.card_data = ModelCardData()
        # The model's setting wins over the encoder's own default (its train() honours it).
        self.encoder.frozen = config.freeze_encoder
        self.encoder.requires_grad_(not config.freeze_encoder)
        if config.freeze_encoder:
            self.encoder.eval()
        template = create("template", config.template.name, **config.template.kwargs)
        max_length = config.max_length or backbone.max_length
        self.sequence_builder = SequenceBuilder(
            backbone.tokenizer,
            template,
            encoder.num_tokens,
            backbone.image_start_id,
            backbone.image_end_id,
            max_length=max_length,
            truncation=config.truncation,
            pad_id=getattr(backbone, "pad_id", 0),
        )

    # -- assembly ----------------------------------------------------------------------------
    def _check_shapes(self) -> None:
        c = self.config
        enc, proj, bb, head = (f"{k} '{getattr(c, k).name}'" for k in _KINDS)
        checks = [
            (
                self.projector.in_dim,
                self.encoder.hidden_size,
                f"{enc} gives {self.encoder.hidden_size}-d tokens but {proj} was built for "
                f"{self.projector.in_dim}-d inputs; set projector in_dim or pick another encoder",
            ),
            (
                self.projector.out_dim,
                self.backbone.hidden_size,
                f"{proj} outputs {self.projector.out_dim}-d but {bb} has hidden size "
                f"{self.backbone.hidden_size}; set projector out_dim or pick another backbone",
            ),
            (
                self.head.in_dim,
                self.backbone.hidden_size,
                f"{head} reads {self.head.in_dim}-d states but {bb} has hidden size "
                f"{self.backbone.hidden_size}; set head in_dim or pick another backbone",
            ),
            (
                self.head.out_dim,
                self.encoder.hidden_size,
                f"{head} predicts {self.head.out_dim}-d tokens but {enc} gives "
                f"{self.encoder.hidden_size}-d tokens; set head out_dim or pick another encoder",
            ),
        ]
        for got, want, message in checks:
            if got != want:
                raise ShapeMismatchError(message)

    @classmethod
    def from_config(
        cls,
        config: MetaMorphConfig | dict[str, Any],
        components: dict[str, nn.Module] | None = None,
    ) -> MetaMorphModel:
        """Create every component by registry name, except those given in ``components``
        (kind -> module, e.g. loaded from a checkpoint); projector/head widths default to the
        encoder's and backbone's."""
        if isinstance(config, dict):
            config = MetaMorphConfig.from_dict(config)
        built = dict(components or {})
        for kind in ("encoder", "backbone"):
            if kind not in built:
                spec = getattr(config, kind)
                built[kind] = create(kind, spec.name, **spec.kwargs)
        enc_dim, bb_dim = built["encoder"].hidden_size, built["backbone"].hidden_size
        dims = {"projector": (enc_dim, bb_dim), "head": (bb_dim, enc_dim)}
        for kind, (in_dim, out_dim) in dims.items():
            if kind not in built:
                spec = getattr(config, kind)
                built[kind] = create(
                    kind, spec.name, **{"in_dim": in_dim, "out_dim": out_dim, **spec.kwargs}
                )
        loss = create("loss", config.visual_loss.name, **config.visual_loss.kwargs)
        decoder = built.pop("decoder", None)
        model = cls(**built, visual_loss=loss, config=config)  # type: ignore[arg-type]
        if decoder is None and config.decoder is not None:
            kw = {
                "token_dim": enc_dim,
                "num_tokens": built["encoder"].num_tokens,
                **config.decoder.kwargs,
            }
            decoder = create("decoder", config.decoder.name, **kw)
        if decoder is not None:
            model._check_decoder(decoder)
            model.decoder = decoder  # config.decoder already says how it was built
        return model

    #: settings that change what is trained or generated, not what the model is: a model loaded
    #: from a checkpoint may change them (:meth:`update_config`)
    UPDATABLE = (
        "visual_loss_weight",
        "text_loss_weight",
        "max_length",
        "truncation",
        "image_answer_prefix",
    )

    def update_config(self, **settings: Any) -> None:
        """Change :data:`UPDATABLE` settings of the config (e.g. the visual loss weight of a
        model loaded from stage 1, which trained without it); components cannot change this
        way, they come from the checkpoint."""
        fixed = sorted(set(settings) - set(self.UPDATABLE))
        if fixed:
            raise ValueError(
                f"MetaMorphConfig field(s) {fixed} cannot change on a built model (its "
                f"components come from where it was loaded); changeable: {list(self.UPDATABLE)}"
            )
        for key, value in settings.items():
            setattr(self.config, key, value)
        builder = self.sequence_builder
        if "max_length" in settings:
            builder.max_length = self.config.max_length or self.backbone.max_length
        if "truncation" in settings:
            builder.truncation = self.config.truncation

    # -- LoRA --------------------------------------------------------------------------------
    def apply_lora(self, **lora: Any) -> None:
        """Wrap the backbone's LLM with peft LoRA (see ``HFCausalLM.apply_lora``); the image
        tokens' embedding rows train through peft's trainable tokens."""
        if not hasattr(self.backbone, "apply_lora"):
            raise ValueError(f"backbone '{self.config.backbone.name}' does not support LoRA")
        self.backbone.apply_lora(**lora)

    def merge_lora(self) -> None:
        """Fold the LoRA weights (and trained token rows) into the backbone's own weights."""
        self.backbone.merge_lora()

    # -- decoding ----------------------------------------------------------------------------
    def attach_decoder(self, decoder: VisualDecoder) -> None:
        """Attach a visual decoder so predicted tokens decode to pixels (saved with the model).

        The decoder becomes a submodule: ``model.to(...)`` moves it and ``model.parameters()``
        includes it, so build the VPiT optimiser from the parts being tuned, not the whole."""
        self._check_decoder(decoder)
        self.config.decoder = _spec_of(decoder, "decoder")
        self.decoder = decoder

    def _check_decoder(self, decoder: VisualDecoder) -> None:
        enc = f"encoder '{self.config.encoder.name}'"
        name = getattr(decoder, "metamorph_spec", {}).get("name", type(decoder).__name__)
        if (
            decoder.token_dim != self.encoder.hidden_size
            or decoder.num_tokens != self.num_image_tokens
        ):
            raise ShapeMismatchError(
                f"decoder '{name}' reads {decoder.num_tokens} tokens of width {decoder.token_dim} "
                f"but {enc} gives {self.num_image_tokens} tokens of width "
                f"{self.encoder.hidden_size}; train the decoder on this encoder's tokens"
            )

    def require_decoder(self) -> VisualDecoder:
        """The attached decoder; a clear error saying how to attach one if there is none."""
        if self.decoder is None:
            raise ValueError(
                "no visual decoder is attached, so visual tokens cannot become pixels; attach "
                "one with model.attach_decoder(create('decoder', 'sd-unet', pretrained=DIR, "
                "...)) or set MetaMorphConfig.decoder"
            )
        return self.decoder

    def decode_images(
        self, tokens: torch.Tensor, config: DecodeConfig | None = None, **options: Any
    ) -> Any:
        """``(b, num_tokens, c)`` visual tokens -> images, through the attached decoder;
        ``config`` / ``options``: its sampling (:class:`~metamorph_core.decoding.DecodeConfig`
        fields: ``scheduler``, ``steps``, ``guidance_scale``, ``seed``)."""
        return self.require_decoder().decode(tokens, config, **options)

    # -- generation --------------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        images: Sequence[Any] | None = None,
        *,
        response_prefix: str | Sequence[str] = "",
        config: GenerationConfig | None = None,
        **options: Any,
    ) -> list[GenerationResult]:
        """Generate text and images for ``prompts`` (strings or conversations ending in a user
        turn); one :class:`~metamorph_core.generation.GenerationResult` per prompt. ``options``
        are :class:`~metamorph_core.generation.GenerationConfig` fields (``max_new_tokens``,
        ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``stop``,
        ``visual_guidance_scale``, ``decode_images``, ``decoding`` ...). See
        :mod:`metamorph_core.generation`."""
        return generation.generate(
            self, prompts, images, response_prefix=response_prefix, config=config, **options
        )

    def generate_image(
        self,
        prompts: Prompt | Sequence[Prompt],
        images: Sequence[Any] | None = None,
        *,
        response_prefix: str | Sequence[str] | None = None,
        config: GenerationConfig | None = None,
        **options: Any,
    ) -> list[GenerationResult]:
        """Text-to-image (image-to-image with input ``images``): the answer is prefilled with
        ``response_prefix`` (default: ``config.image_answer_prefix``, the words the training
        data answers with) + ``<image_start>``, so each result holds exactly one image."""
        return generation.generate_image(
            self, prompts, images, response_prefix=response_prefix, config=config, **options
        )

    def stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        images: Sequence[Any] | None = None,
        *,
        response_prefix: str | Sequence[str] | None = None,
        force_image: bool = False,
        config: GenerationConfig | None = None,
        **options: Any,
    ) -> Iterator[GenerationEvent]:
        """Like :meth:`generate` (or :meth:`generate_image` with ``force_image``), yielding
        text pieces, images and finished results as they come
        (:class:`~metamorph_core.generation.TextEvent`, ``ImageEvent``, ``DoneEvent``)."""
        return generation.stream(
            self,
            prompts,
            images,
            response_prefix=response_prefix,
            force_image=force_image,
            config=config,
            **options,
        )

    # -- data --------------------------------------------------------------------------------
    @property
    def num_image_tokens(self) -> int:
        return self.encoder.num_tokens

    @property
    def image_answer_prefix(self) -> str:
        """What an answer says before a generated image when the caller does not say."""
        return self.config.image_answer_prefix

    def prepare_batch(
        self,
        conversations: list[Conversation],
        add_generation_prompt: bool = False,
        pack_to: int | None = None,
    ) -> dict[str, Any]:
        """Conversations -> a batch for :meth:`forward` on the model's device (images
        preprocessed by the encoder; :class:`~metamorph_core.conversation.PixelValues` and
        :class:`~metamorph_core.conversation.ImageFeatures` stacked as they are). ``pack_to``: pack samples into rows of that many tokens
        (:func:`metamorph_core.sequence.pack`) instead of padding each to the longest."""
        samples = [self.sequence_builder.encode(c, add_generation_prompt) for c in conversations]
        pad_id = self.sequence_builder.pad_id
        batch = pack(samples, pack_to, pad_id) if pack_to else collate(samples, pad_id=pad_id)
        images = batch.pop("images")
        cached = [isinstance(x, ImageFeatures) for x in images]
        ready = [isinstance(x, PixelValues) for x in images]
        if images and all(cached):  # encoded once, ahead of time: the encoder is skipped
            batch["image_features"] = torch.stack([x.tokens for x in images])
        elif any(cached):
            raise ValueError(
                "a batch mixes cached image features with raw images; encode all or none"
            )
        elif images and all(ready):  # preprocessed already (in the data loader's workers)
            batch["pixel_values"] = stack_pixels([x.pixels for x in images])
        elif any(ready):
            raise ValueError(
                "a batch mixes preprocessed pixel values with raw images; preprocess all or none"
            )
        elif images:
            batch["pixel_values"] = self.encoder.preprocess(images)
        device = next(self.backbone.parameters()).device
        return {
            k: move_pixels(v, device) if k == "pixel_values" else v.to(device)
            for k, v in batch.items()
        }

    def encode_images(self, pixel_values: Pixels) -> torch.Tensor:
        """``n`` images as the encoder's ``preprocess`` gives them (``(n, 3, h, w)``, or its
        dict of fields) -> ``(n, num_tokens, c)`` encoder tokens (no grad when frozen)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_encoder):
            return self.encoder(pixel_values)

    def check_image_tokens(self, tokens: torch.Tensor, n_slots: int) -> None:
        """Raise unless ``tokens`` are ``(n_slots / num_image_tokens, num_image_tokens, c)``:
        one image's tokens per ``<image>`` of the batch, of this encoder's width."""
        n, c = self.num_image_tokens, self.encoder.hidden_size
        want = (n_slots // n, n, c)
        if tokens.dim() != 3 or tuple(tokens.shape) != want:
            raise ValueError(
                f"the batch has {n_slots} image slots, i.e. {want[0]} images of {n} tokens of "
                f"width {c}, but the image tokens have shape {tuple(tokens.shape)}; pass one "
                "image per <image> placeholder, in order, encoded by this model's encoder"
            )

    def project_visual(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(..., c)`` visual tokens -> ``(..., d)`` backbone inputs through the projector (in
        the projector's dtype)."""
        return self.projector(tokens.to(module_dtype(self.projector)))

    def predict_visual_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., d)`` final hidden states -> ``(..., c)`` float32 visual tokens: the vision
        head's output, L2-normalised (what generation emits and feeds back)."""
        out = self.head(hidden.to(module_dtype(self.head))).float()
        return F.normalize(out, dim=-1)

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        image_slot_mask: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The backbone's input embeddings ``(b, l, d)`` of ``input_ids`` ``(b, l)``, with the
        images' visual tokens ``(n, num_image_tokens, c)`` (slot order) written through the
        projector into the positions of ``image_slot_mask`` ``(b, l)``. Training and
        generation both build their inputs here. Without images, while gradients are on, the
        projector still takes part with a zero contribution (DDP expects every trained
        parameter in every step)."""
        embeds = self.backbone.embed(input_ids)
        if image_slot_mask is not None and bool(image_slot_mask.any()):
            if image_tokens is None:
                raise ValueError(
                    "image_slot_mask marks image positions but no image_tokens were given"
                )
            self.check_image_tokens(image_tokens, int(image_slot_mask.sum()))
            proj = self.project_visual(image_tokens.to(embeds.device))  # (n, t, d)
            return embeds.masked_scatter(image_slot_mask.unsqueeze(-1), proj.to(embeds.dtype))
        if torch.is_grad_enabled():
            zero = embeds.new_zeros(1, self.projector.in_dim, dtype=module_dtype(self.projector))
            embeds = embeds + self.projector(zero).sum().to(embeds.dtype) * 0.0
        return embeds

    # -- forward -----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_slot_mask: torch.Tensor | None = None,
        target_slot_mask: torch.Tensor | None = None,
        pixel_values: Pixels | None = None,
        image_features: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_logits: bool = True,
        image_is_target: torch.Tensor | None = None,  # from collate/pack; the slots carry it
        sample_index: torch.Tensor | None = None,  # from pack; for per-sample accounting
        input_noise: tuple[float, int] | None = None,
        loss_chunk: int | None = None,
    ) -> MetaMorphOutput:
        """VPiT forward. ``input_ids`` etc. ``(b, l)``; images as ``pixel_values`` (``(n, 3, h,
        w)``, or the encoder's dict of fields: :mod:`metamorph_core.pixels`) or precomputed
        ``image_features`` ``(n, num_tokens, c)``, in slot order. Packed rows (``position_ids``
        restarting per sample, no ``attention_mask``) attend within each sample only.
        ``input_noise`` ``(max_level, seed)``: the target images' tokens are read
        through :func:`~metamorph_core.vision.perturb_tokens` (their targets stay clean).
        ``loss_chunk`` (with ``return_logits=False``): the labelled positions go through the
        vocabulary projection and cross-entropy that many at a time, each chunk's logits
        recomputed in backward instead of kept (the ``(positions, vocabulary)`` logits never
        exist at once); same loss and gradients."""
        if loss_chunk is not None and not (isinstance(loss_chunk, int) and loss_chunk >= 1):
            raise ValueError(f"loss_chunk must be an integer >= 1 (or None), got {loss_chunk!r}")
        head_dtype = module_dtype(self.head)
        tokens = read = None
        if image_slot_mask is not None and bool(image_slot_mask.any()):
            device = input_ids.device
            if image_features is not None:
                tokens = image_features.to(device)
            elif pixel_values is not None:
                tokens = self.encode_images(move_pixels(pixel_values, device))
            else:
                raise ValueError(
                    "the batch has image slots but neither pixel_values nor image_features; "
                    "build batches with model.prepare_batch or pass the images' features"
                )
            read = tokens
            if input_noise is not None and image_is_target is not None:
                read = self._noisy_targets(tokens, image_is_target, *input_noise)
        embeds = self.embed_inputs(input_ids, image_slot_mask, read)
        hidden = self.backbone(
            embeds, attention_mask=attention_mask, position_ids=position_ids
        ).hidden_states  # (b, l, d), after the final norm

        logits = self.backbone.logits(hidden) if return_logits or labels is None else None
        zero = hidden.new_zeros((), dtype=torch.float32)
        text_sum, text_count = zero, zero
        if labels is not None:
            shift_labels = labels[:, 1:]
            valid = shift_labels != IGNORE_INDEX
            if logits is not None:
                text_sum = _text_loss_sum(logits[:, :-1][valid], shift_labels[valid])
            else:  # only the positions that carry a label reach the vocabulary projection
                text_sum = self._text_loss(hidden[:, :-1][valid], shift_labels[valid], loss_chunk)
            text_count = valid.sum().to(torch.float32)

        vis_sum, vis_count = zero, zero
        if target_slot_mask is not None and tokens is not None and bool(target_slot_mask.any()):
            assert image_slot_mask is not None
            states = hidden[:, :-1][target_slot_mask[:, 1:]]  # (t, d): state t-1 predicts t
            pred = self.head(states.to(head_dtype))  # (t, c)
            flat = tokens.reshape(-1, tokens.shape[-1])  # (n * num_tokens, c), slot order
            target = flat[target_slot_mask[image_slot_mask]].detach()
            vis_sum = self.visual_loss_fn(pred, target).sum()
            vis_count = target_slot_mask.sum().to(torch.float32)
        else:  # no target image: loss 0, but the head stays in the graph (DDP sees every param)
            vis_sum = self.head(hidden[:, :1].to(head_dtype)).float().sum() * 0.0

        text_loss = text_sum / text_count.clamp(min=1)
        visual_loss = vis_sum / vis_count.clamp(min=1)
        c = self.config
        loss = c.text_loss_weight * text_loss + c.visual_loss_weight * visual_loss
        return MetaMorphOutput(
            loss, text_loss, visual_loss, text_sum, text_count, vis_sum, vis_count, logits, hidden
        )

    def _text_loss(
        self, states: torch.Tensor, targets: torch.Tensor, chunk: int | None
    ) -> torch.Tensor:
        """Summed cross-entropy of ``(t, d)`` final states against ``(t,)`` token ids; in
        chunks of ``chunk`` positions whose logits backward recomputes."""
        if chunk is None or len(states) <= chunk:
            return _text_loss_sum(self.backbone.logits(states), targets)
        from torch.utils.checkpoint import checkpoint

        def piece(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return _text_loss_sum(self.backbone.logits(s), t)

        return sum(
            (
                checkpoint(
                    piece, states[i : i + chunk], targets[i : i + chunk], use_reentrant=False
                )
                for i in range(0, len(states), chunk)
            ),
            states.new_zeros((), dtype=torch.float32),
        )

    @staticmethod
    def _noisy_targets(
        tokens: torch.Tensor, is_target: torch.Tensor, max_level: float, seed: int
    ) -> torch.Tensor:
        """``tokens`` ``(n, t, c)`` with the target images' rows perturbed (the others as
        they are), drawn on the CPU from ``seed``."""
        is_target = is_target.to(tokens.device)
        if len(is_target) != len(tokens):
            raise ValueError(
                f"image_is_target has {len(is_target)} entries for {len(tokens)} images; build "
                "batches with model.prepare_batch"
            )
        generator = torch.Generator().manual_seed(int(seed))
        noisy = perturb_tokens(tokens.detach().cpu(), max_level, generator).to(tokens.device)
        return torch.where(is_target[:, None, None], noisy.to(tokens.dtype), tokens)

    # -- checkpoints -------------------------------------------------------------------------
    def save_pretrained(
        self, path: str | Path, *, card_data: ModelCardData | dict[str, Any] | None = None
    ) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (+ a subfolder per component that
        saves itself, e.g. ``backbone/`` in transformers format) + ``README.md`` (the model
        card), atomically (:mod:`metamorph_core.saving`). ``card_data``
        (:class:`~metamorph_core.model_card.ModelCardData` or a dict of its fields) replaces
        :attr:`card_data` for this save."""
        return saving.save_model(self, path, card_data)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: str | None = None,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> MetaMorphModel:
        """Load a directory written by :meth:`save_pretrained`, or a Hugging Face Hub repo id
        (``"org/name"``) holding one; an existing local path wins. Hub ids are fetched with
        ``huggingface_hub.snapshot_download`` (the ``hub`` extra) at ``revision`` into
        ``cache_dir``; with ``local_files_only=True`` or ``HF_HUB_OFFLINE=1`` only the cache is
        read. ``dtype`` overrides the backbone's recorded dtype; ``backbone_kwargs`` any of the
        backbone's recorded load options (e.g. ``{"quantize": None}``: a QLoRA checkpoint's
        base in full precision, ``{"attn_implementation": "sdpa"}``)."""
        return saving.load_model(
            cls,
            path,
            dtype,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            backbone_kwargs=backbone_kwargs,
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        card_data: ModelCardData | dict[str, Any] | None = None,
    ) -> Any:
        """Save as :meth:`save_pretrained` does and upload the checkpoint to the Hub model repo
        ``repo_id`` (created if missing; branch ``revision`` created if missing) in one commit;
        :meth:`from_pretrained` then loads ``repo_id``. Returns ``huggingface_hub``'s
        ``CommitInfo``. See :func:`metamorph_core.saving.push_model`."""
        return saving.push_model(
            self,
            repo_id,
            private=private,
            token=token,
            revision=revision,
            commit_message=commit_message,
            card_data=card_data,
        )

    def present_kinds(self) -> tuple[str, ...]:
        """The component kinds this model holds (the decoder only when one is attached)."""
        return (*_KINDS, "decoder") if self.decoder is not None else _KINDS


def _text_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="sum")
