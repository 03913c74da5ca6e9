"""What the training benchmarks run, shared by ``bench_training.py`` and ``gpu.py``: models
built through metamorph's own loaders, conversations of exact token lengths, one optimiser
step as metamorph's trainer takes it, the same step on transformers'
``LlavaForConditionalGeneration`` with the same weights, and the model FLOPs of a step.

Model FLOPs of one training step (the count behind every MFU figure; PaLM's convention, no
causal-mask halving, no recomputation counted, norms / softmax / elementwise work ignored):

- every matmul of a *trained* part costs ``6 x params x tokens`` (forward 2, backward 4);
- a matmul of a *frozen* part that gradients still flow through (a LoRA-wrapped backbone's
  base weights) costs ``4 x params x tokens`` (forward, and the input gradient);
- a frozen part nothing flows back through (the encoder) costs ``2 x params x tokens``;
- attention scores and weighted sums cost ``4 x layers x width x s^2`` per sequence of ``s``
  tokens forward (``QK^T`` and ``AV``), three times that with a backward;
- the output projection (``lm_head``) counts at the positions whose next token is trained
  (the loss needs no others: metamorph projects only those; LLaVA's forward projects every
  position, and that extra work is not counted); the embedding lookup is no matmul;
  "tokens" are real tokens: padding is not model work.
- encoder: patch embedding (``3 p^2 x width`` params per patch) and every block, over all
  patches of each image; the projector over every image token; the vision head over the
  target tokens.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metamorph_core import MetaMorphModel
from metamorph_core.conversation import Conversation, ImageFeatures, Turn
from metamorph_core.sequence import IGNORE_INDEX

# The mid-size configuration: a Llama-style backbone (hidden 512, 8 layers, vocabulary
# 32000) and a small SigLIP-style encoder whose 8x8 patch grid gives 64 tokens directly.
MID_BACKBONE: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "max_position_embeddings": 2048,
}
SMALL_SIGLIP: dict[str, Any] = {
    "hidden_size": 384,
    "intermediate_size": 1536,
    "num_hidden_layers": 6,
    "num_attention_heads": 6,
    "image_size": 128,
    "patch_size": 16,
}
# --smoke: the same code path on shapes that take milliseconds
TINY_BACKBONE: dict[str, Any] = {
    "vocab_size": 1000,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
}
TINY_SIGLIP: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 4,
}

# GPU shapes (random weights, built directly on the device): Llama-3.2-1B, Llama-3-8B and
# SigLIP so400m-patch14-384
LLAMA_1B: dict[str, Any] = {
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
}
LLAMA_8B: dict[str, Any] = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}
SO400M: dict[str, Any] = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
}
# --smoke stand-ins for them: an encoder whose grid (9x9) is reduced, as so400m's 27x27 is
TINY_LLAMA_GQA: dict[str, Any] = {**TINY_BACKBONE, "num_key_value_heads": 2, "vocab_size": 2000}
TINY_SO400M: dict[str, Any] = {**TINY_SIGLIP, "image_size": 36}

# words of the offline test tokenizer's corpus, for conversation text
_CORPUS = (
    "a red square on the left blue circle in the middle green triangle at top what colour "
    "is shape generate an image of yellow star here based your request grass and sky has "
    "three sides four two plus five describe it shows small purple hexagon bottom right"
)
WORDS = _CORPUS.split()


# -- models ----------------------------------------------------------------------------------
def save_backbone(directory: Path, config: dict[str, Any], seed: int = 0) -> Path:
    """A random Llama-style causal LM of ``config``'s shape and the offline test tokenizer,
    saved with ``save_pretrained`` (loaded back through the ``hf-causal-lm`` backbone, as a hub
    checkpoint would be)."""
    from metamorph_core.testing import save_tiny_backbone

    cfg = dict(config)
    return save_tiny_backbone(
        directory,
        "llama",
        hidden_size=cfg.pop("hidden_size"),
        num_layers=cfg.pop("num_hidden_layers"),
        seed=seed,
        **cfg,
    )


def save_siglip(directory: Path, config: dict[str, Any], seed: int = 0) -> Path:
    """A random ``SiglipVisionModel`` saved with ``save_pretrained`` (for the ``siglip``
    encoder's loader)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tower = SiglipVisionModel(SiglipVisionConfig(**config, vision_use_head=False))
    tower.save_pretrained(str(directory))
    return directory


def model_config(
    encoder: dict[str, Any], backbone: dict[str, Any], num_tokens: int | None = 64
) -> dict[str, Any]:
    """A :class:`~metamorph_core.MetaMorphModel` config: the ``siglip`` encoder (last block,
    no L2 normalisation, so that LLaVA, which feeds raw features, sees the same tokens;
    ``num_tokens=None``: every patch, no reduction), the paper's ``mlp2x_gelu`` projector and
    head, the ``llama3`` template."""
    tokens: dict[str, Any] = {"num_tokens": num_tokens}
    if num_tokens is None:
        tokens["reduction"] = "none"
    return {
        "encoder": {"name": "siglip", "kwargs": {**tokens, "normalize": False, **encoder}},
        "backbone": {"name": "hf-causal-lm", "kwargs": backbone},
        "projector": "mlp2x_gelu",
        "head": "mlp2x_gelu",
        "template": "llama3",
    }


def build_saved_model(
    tmp: Path, backbone: dict[str, Any], encoder: dict[str, Any], seed: int = 0
) -> MetaMorphModel:
    """Save random weights of both shapes under ``tmp`` and assemble the model from them
    through the registry's ``hf-causal-lm`` and ``siglip`` loaders."""
    save_backbone(tmp / "backbone", backbone, seed)
    save_siglip(tmp / "siglip", encoder, seed)
    torch.manual_seed(seed)  # projector and head
    return MetaMorphModel.from_config(
        model_config({"pretrained": str(tmp / "siglip")}, {"pretrained": str(tmp / "backbone")})
    )


def build_random_model(
    tmp: Path,
    backbone: dict[str, Any],
    encoder: dict[str, Any],
    device: str,
    dtype: str = "float32",
    num_tokens: int | None = 64,
    seed: int = 0,
) -> MetaMorphModel:
    """Random weights of both shapes created directly on ``device`` (inside a device context:
    no CPU initialisation, no checkpoint on disk), through the ``hf-causal-lm`` (``config=``)
    and ``siglip`` (``config=``) components; the offline test tokenizer is saved in ``tmp``.
    ``dtype``: the backbone's and the encoder's weights (projector and head stay float32)."""
    from metamorph_core.testing import build_tiny_tokenizer

    build_tiny_tokenizer("llama").save_pretrained(str(tmp / "tokenizer"))
    config = model_config(
        {"config": encoder, "dtype": dtype, "seed": seed, "attn_implementation": "sdpa"},
        {
            "config": {"model_type": "llama", **backbone},
            "tokenizer": str(tmp / "tokenizer"),
            "dtype": dtype,
            "seed": seed,
            "attn_implementation": "sdpa",
        },
        num_tokens,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        return MetaMorphModel.from_config(config)


# -- data ------------------------------------------------------------------------------------
def image_like(model: MetaMorphModel, g: torch.Generator) -> torch.Tensor:
    """A random ``(3, h, w)`` image in [0, 1] at the encoder's input size."""
    h, w = model.encoder.image_size
    return torch.rand(3, h, w, generator=g)


def conversation(
    model: MetaMorphModel, length: int, kind: str, rng: random.Random, image: Any
) -> Conversation:
    """A conversation of exactly ``length`` tokens with one image: ``understanding`` (image in
    the user turn, a text answer) or ``generation`` (a text prompt, the image as the
    assistant's target). Words are added to the text that carries the padding (the answer, or
    the prompt) until the length is reached."""
    builder = model.sequence_builder

    def make(words: list[str]) -> Conversation:
        text = " ".join(words)
        if kind == "understanding":
            turns = [Turn("user", "<image>\nDescribe the image."), Turn("assistant", text)]
        elif kind == "generation":
            turns = [
                Turn("user", f"Generate an image: {text}"),
                Turn("assistant", "Here is an image based on your request: <image>"),
            ]
        else:
            raise ValueError(f"unknown conversation kind '{kind}'")
        return Conversation(turns, [image])

    words: list[str] = []
    while (n := len(builder.encode(make(words)))) < length:  # words are >= 1 token each
        words += [rng.choice(WORDS) for _ in range(max(1, (length - n) // 3))]
    while len(builder.encode(make(words))) > length:
        if not words:
            raise ValueError(f"a {kind} conversation needs more than {length} tokens")
        words.pop()
    while len(builder.encode(make(words))) < length:
        words.append("a")  # one token each
    made = make(words)
    if len(builder.encode(made)) != length:
        raise RuntimeError(f"cannot build a {kind} conversation of exactly {length} tokens")
    return made


def conversations(
    model: MetaMorphModel, lengths: list[int], kinds: list[str], seed: int = 0
) -> list[Conversation]:
    g, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    return [
        conversation(model, n, k, rng, image_like(model, g))
        for n, k in zip(lengths, kinds, strict=True)
    ]


@torch.no_grad()
def cached(model: MetaMorphModel, convs: list[Conversation]) -> list[Conversation]:
    """The same conversations with each image replaced by its encoder tokens, as a feature
    cache stores them (:class:`~metamorph_core.conversation.ImageFeatures`)."""
    device = next(model.encoder.parameters()).device
    out = []
    for c in convs:
        pixels = model.encoder.preprocess(c.images).to(device)
        feats = [ImageFeatures(t) for t in model.encoder(pixels)]
        out.append(Conversation(c.turns, feats, c.id))
    return out


# -- one step --------------------------------------------------------------------------------
def autocast(device: str, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on ``device`` (``cpu``, ``cuda``, ``cuda:1`` ...) when ``bf16``."""
    kind = torch.device(device).type
    return torch.autocast(device_type=kind, dtype=torch.bfloat16, enabled=bf16)


@dataclass
class Step:
    """One optimiser step, as ``metamorph_train.Trainer`` takes it for one micro-batch: loss
    sums over their token counts under optional bf16 autocast, backward, gradient clipping at
    1.0, AdamW. ``loss`` computes the loss; calling the step takes the whole step."""

    loss: Callable[[], torch.Tensor]
    params: list[torch.nn.Parameter]
    device: str
    bf16: bool = False
    lr: float = 1e-5

    def __post_init__(self) -> None:
        from metamorph_train.trainer import adamw  # the trainer's own (fused where it can be)

        self.optimizer = adamw(self.params, lr=self.lr)

    def __call__(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.bf16):
            loss = self.loss()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        return loss.detach()


def vpit_loss(objective: Any, batch: dict[str, Any]) -> Callable[[], torch.Tensor]:
    """The trainer's loss for ``batch`` through ``objective`` (a ``VPiTObjective``): each
    term's sum over its count, weighted."""
    totals = [max(c, 1.0) for c in objective.counts(batch)]

    def loss() -> torch.Tensor:
        parts = objective.loss_sums(objective.module, batch)
        return sum(w * s / n for w, s, n in zip(objective.weights, parts, totals, strict=True))

    return loss


def trainable(objective: Any, policy: str = "full") -> list[torch.nn.Parameter]:
    """The parameters metamorph's VPiT ``policy`` (``full``, ``lora``, ``projector``) tunes;
    as the trainer does, every other parameter stops requiring grad."""
    from metamorph_train.objectives import POLICIES

    pick = POLICIES[policy].select
    chosen = []
    for name, param in objective.module.named_parameters():
        keep = pick(objective.module, name, param)
        param.requires_grad_(keep)
        if keep:
            chosen.append(param)
    return chosen


# -- LLaVA -----------------------------------------------------------------------------------
def build_llava(model: MetaMorphModel, image_token_id: int) -> Any:
    """transformers' ``LlavaForConditionalGeneration`` with ``model``'s configuration and
    weights: the SigLIP tower (features of its last block, all patches), the two-layer GELU
    projector and the Llama backbone with its ``lm_head``; the tower frozen, as ours is. Built
    on the device of ``model`` (through a device context: no init on the CPU first)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    text = model.backbone.causal_lm.config
    vision = model.encoder.model.config
    proj = model.projector.net
    if model.encoder.layer != -1 or model.encoder.normalize or len(proj) != 3:
        raise ValueError("the LLaVA twin needs the last-layer, unnormalised encoder and mlp2x_gelu")
    config = LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
    )
    device = next(model.parameters()).device
    dtype = model.backbone.dtype
    with torch.device(device):
        llava = LlavaForConditionalGeneration(config).to(dtype)
    inner = llava.model
    inner.vision_tower.load_state_dict(model.encoder.model.state_dict())
    inner.language_model.load_state_dict(model.backbone.causal_lm.model.state_dict())
    llava.lm_head.load_state_dict(model.backbone.causal_lm.lm_head.state_dict())
    inner.multi_modal_projector.linear_1.load_state_dict(proj[0].state_dict())
    inner.multi_modal_projector.linear_2.load_state_dict(proj[2].state_dict())
    inner.vision_tower.requires_grad_(False).eval()
    return llava


def llava_batch(batch: dict[str, Any], image_token_id: int) -> dict[str, Any]:
    """Our collated batch as LLaVA takes it: the image slots hold LLaVA's image token."""
    ids = batch["input_ids"].clone()
    ids[batch["image_slot_mask"]] = image_token_id
    return {
        "input_ids": ids,
        "attention_mask": batch["attention_mask"],
        "pixel_values": batch["pixel_values"],
        "labels": batch["labels"],
    }


def llava_loss(llava: Any, batch: dict[str, Any]) -> Callable[[], torch.Tensor]:
    return lambda: llava(**batch).loss


# -- FLOPs -----------------------------------------------------------------------------------
def backbone_params(config: Any) -> tuple[int, int]:
    """Matmul parameters of a Llama-style backbone: (the blocks, the output projection)."""
    d, layers = config.hidden_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    attention = d * heads * head_dim + 2 * d * kv * head_dim + heads * head_dim * d
    mlp = 3 * d * config.intermediate_size
    return layers * (attention + mlp), d * config.vocab_size


def encoder_flops(config: Any) -> float:
    """Forward FLOPs of one image through a ViT of ``config`` (all patches, every block)."""
    d, p = config.hidden_size, config.patch_size
    patches = (config.image_size // p) ** 2
    block = 4 * d * d + 2 * d * config.intermediate_size
    params = config.num_hidden_layers * block + 3 * p * p * d
    return 2 * params * patches + 4 * config.num_hidden_layers * d * patches**2


def _linear_params(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def sample_lengths(batch: dict[str, Any]) -> list[int]:
    """Real tokens of each sample in a collated (``attention_mask``) or packed
    (``sample_index``) batch."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum(1).tolist()
    index = batch["sample_index"]
    return torch.bincount(index[index >= 0]).tolist()


def step_flops(
    model: MetaMorphModel,
    batch: dict[str, Any],
    backbone: str = "full",
    encoder_runs: bool = True,
    lora_params: int = 0,
) -> float:
    """Model FLOPs of one training step on ``batch`` (see the module docstring).
    ``backbone``: ``full`` (trained), ``lora`` (frozen base, gradients through it, plus
    ``lora_params`` trained); ``encoder_runs``: False when the batch carries cached features."""
    cfg = model.backbone.causal_lm.config.get_text_config()
    blocks, out_proj = backbone_params(cfg)
    lengths = sample_lengths(batch)
    tokens = sum(lengths)
    per_param = {"full": 6, "lora": 4}[backbone]
    width = cfg.num_attention_heads * (
        getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    )
    labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    flops = per_param * (blocks * tokens + out_proj * labelled) + 6 * lora_params * tokens
    flops += 12 * cfg.num_hidden_layers * width * sum(n * n for n in lengths)
    image_tokens = int(batch["image_slot_mask"].sum())
    images = image_tokens // model.num_image_tokens
    if encoder_runs and images:
        flops += images * encoder_flops(model.encoder.model.config)
    flops += 6 * _linear_params(model.projector) * image_tokens
    flops += 6 * _linear_params(model.head) * int(batch["target_slot_mask"].sum())
    return float(flops)


def state_mib(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Exact bytes held by the weights, the gradients and the optimizer state (whatever the
    allocator keeps besides), in MiB."""

    def size(tensors: Any) -> float:
        return sum(t.numel() * t.element_size() for t in tensors if t is not None) / 2**20

    params = list(model.parameters())
    states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {
        "MiB weights": size(params),
        "MiB grads + optimizer state": size([p.grad for p in params]) + size(states),
    }


def matmul_peak_case(
    n: int, dtype: torch.dtype, device: str, repeat: int = 1
) -> tuple[Callable[[], Any], float]:
    """``repeat`` square ``n`` matmuls in ``dtype`` (the machine's practical peak) and their
    GFLOP (repeated so that a run is long enough for the harness's load check)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)

    def run() -> None:
        for _ in range(repeat):
            torch.matmul(a, b, out=out)

    return run, repeat * 2 * n**3 / 1e9


def check_close(what: str, ours: float, theirs: float, tol: float) -> float:
    """Relative difference of two losses; stop the run above ``tol``."""
    diff = abs(ours - theirs) / max(abs(theirs), 1e-6)
    if diff > tol:
        raise SystemExit(f"{what}: losses differ ({ours:.6f} vs {theirs:.6f}, rel {diff:.1e})")
    print(f"check {what}: {ours:.6f} vs {theirs:.6f} (rel {diff:.1e})", flush=True)
    return diff
