"""Recipes: YAML files naming components by registry key, with dotted command-line overrides
(``train.lr=1e-4``), parsed into typed dataclasses. Unknown keys fail naming their path.

VPiT recipes (``model`` holds :class:`metamorph_core.MetaMorphConfig` fields):

```yaml
recipe: full                # full: all but the encoder (stage 2); projector: projector only
                            # (stage 1); lora: LoRA on the LLM + projector + head
lora: {r: 16, alpha: 32}    # recipe lora only
model:
  encoder: {name: siglip, kwargs: {pretrained: google/siglip-so400m-patch14-384}}
  backbone: {name: llama, kwargs: {pretrained: meta-llama/Llama-3.1-8B-Instruct, dtype: bfloat16}}
  projector: mlp2x_gelu
  head: mlp2x_gelu
init_from: null             # or a MetaMorph checkpoint to continue from (e.g. stage 1's)
data:
  sources:                  # a file, or with streaming: true a directory / glob of JSONL shards
    - {path: data/train.jsonl, image_root: data/images, weight: 1.0}
  on_error: raise           # or skip (counted in the summary)
  feature_cache: null       # a `metamorph cache-features` directory
train:                      # metamorph_train.trainer.TrainerConfig fields
  output_dir: runs/vpit
  steps: 1000
```

The other recipes take their own ``model`` section (:class:`DecoderModel`,
:class:`SiglipModel`, :class:`CausalLMModel`):

- ``decoder``: a visual decoder learns to draw the images of the sources from the tokens of
  ``model.encoder`` (encoded live, or read from ``data.feature_cache``); saves the decoder in
  the SD layout (``create("decoder", "sd-unet", pretrained=...)`` loads it). The cache may
  be a *predicted* one (``metamorph cache-features --predicted-by``): a decoder given as
  ``pretrained`` is then fine-tuned to draw each image from the tokens a unified model
  generated for its prompt.
- ``encoder-pretrain``: SigLIP sigmoid-loss pretraining on ``{"image", "caption"}`` records;
  saves a directory the ``siglip`` encoder loads.
- ``lm-pretrain``: causal-LM pretraining on ``{"text"}`` records (or conversations without
  images); a tokenizer is trained on the sources when ``model.tokenizer`` is not given; saves a
  transformers directory the ``hf-causal-lm`` backbone loads.

Every recipe writes ``output_dir/final`` (after the last step; under FSDP2 from gathered full
weights) next to its step checkpoints.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from metamorph_train import distributed
from metamorph_train.trainer import TrainerConfig

# VPiT recipe -> which parameters train (after LoRA is applied, for "lora")
VPIT_RECIPES = {
    "full": lambda name, p: not name.startswith(("encoder.", "decoder.")),
    "projector": lambda name, p: name.startswith("projector."),
    "lora": lambda name, p: (
        name.startswith(("projector.", "head."))
        or (name.startswith("backbone.") and p.requires_grad)
    ),
}
OTHER_RECIPES = ("decoder", "encoder-pretrain", "lm-pretrain")
RECIPES = (*VPIT_RECIPES, *OTHER_RECIPES)


@dataclass
class DecoderModel:
    """``model`` of the ``decoder`` recipe: the decoder to train (registry name + kwargs;
    ``token_dim``/``num_tokens`` default to the encoder's) and the frozen encoder whose tokens
    it learns from (it also checks a feature cache)."""

    decoder: dict[str, Any]
    encoder: dict[str, Any]


@dataclass
class SiglipModel:
    """``model`` of the ``encoder-pretrain`` recipe."""

    config: dict[str, Any] = field(default_factory=dict)  # small_siglip_config() arguments
    tokenizer: str | None = None  # a tokenizer directory; None: train one on the captions
    vocab_size: int = 1000  # of a trained tokenizer
    seed: int = 0


@dataclass
class CausalLMModel:
    """``model`` of the ``lm-pretrain`` recipe: a transformers architecture built from a
    config (random weights), or ``pretrained`` to continue from."""

    architecture: str = "llama"  # a transformers model_type
    config: dict[str, Any] = field(default_factory=dict)  # its config fields
    pretrained: str | None = None  # instead of architecture + config
    tokenizer: str | None = None  # a tokenizer directory; None: train one on the sources
    vocab_size: int = 2000  # of a trained tokenizer
    max_length: int = 512  # tokens per text, EOS included
    seed: int = 0


@dataclass
class Source:
    path: str  # a .json/.jsonl file; with streaming, a directory or glob of .jsonl shards
    image_root: str = "."
    weight: float = 1.0
    name: str | None = None
    streaming: bool = False


@dataclass
class DataConfig:
    sources: list[Source] = field(default_factory=list)
    on_error: str = "raise"
    feature_cache: str | None = None
    seed: int = 0


@dataclass
class Recipe:
    model: Any  # MetaMorphConfig fields (VPiT), or DecoderModel / SiglipModel / CausalLMModel
    data: DataConfig
    train: TrainerConfig
    recipe: str = "full"
    init_from: str | None = None  # VPiT recipes: a MetaMorph checkpoint to start from
    lora: dict[str, Any] | None = None  # HFCausalLM.apply_lora options, for recipe "lora"


def _typed(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"recipe key '{where}' must be a mapping, got {data!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(
            f"unknown recipe key(s) {[f'{where}.{k}' for k in unknown]}; '{where}' takes "
            f"{sorted(known)}"
        )
    missing = [
        n
        for n, f in known.items()
        if n not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"recipe key(s) {[f'{where}.{k}' for k in missing]} are required")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()})


_FAIL = object()


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """YAML reads ``1e-4`` as a string; numbers and flags are converted to the field's type."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = typing.get_args(hint) if union else (hint,)
    if value is None and type(None) in options:
        return None
    scalars = [k for k in (bool, int, float) if k in options]
    if not scalars:
        return value
    for kind in scalars:
        converted = _convert(value, kind)
        if converted is not _FAIL:
            return converted
    raise ValueError(
        f"recipe key '{where}' = {value!r} is not a {' or '.join(k.__name__ for k in scalars)}"
    )


def _convert(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        return _FAIL
    if isinstance(value, bool):
        return _FAIL
    try:
        out = kind(value)
        if kind is int and float(value) != out:  # 1.5 is no int
            return _FAIL
    except (TypeError, ValueError):
        return _FAIL
    return out


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ValueError(f"override '{dotted}': '{k}' is not a mapping")
    node[keys[-1]] = value


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe and apply ``key.path=value`` overrides (values parsed as YAML)."""
    path = Path(path)
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ValueError(f"recipe '{path}' must be a YAML mapping")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override '{item}' must look like key.path=value")
        _set(tree, key, yaml.safe_load(raw))
    top = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(tree) - top)
    if unknown:
        raise ValueError(
            f"unknown recipe key(s) {unknown} in '{path}'; top-level keys are {sorted(top)}"
        )
    kind = tree.get("recipe", "full")
    if kind not in RECIPES:
        raise ValueError(f"unknown recipe '{kind}'; known: {list(RECIPES)}")
    model: Any = dict(tree.get("model") or {})
    if kind in OTHER_RECIPES:
        for key in ("init_from", "lora"):
            if tree.get(key):
                raise ValueError(f"recipe key '{key}' applies to VPiT recipes, not '{kind}'")
        shape = {"decoder": DecoderModel, "encoder-pretrain": SiglipModel}.get(kind, CausalLMModel)
        model = _typed(shape, model, "model")
    data = dict(tree.get("data") or {})
    data["sources"] = [
        _typed(Source, s, f"data.sources[{i}]") for i, s in enumerate(data.get("sources") or [])
    ]
    if not data["sources"]:
        raise ValueError("recipe key 'data.sources' needs at least one source")
    return Recipe(
        model=model,
        data=_typed(DataConfig, data, "data"),
        train=_typed(TrainerConfig, tree.get("train") or {}, "train"),
        recipe=kind,
        init_from=tree.get("init_from"),
        lora=tree.get("lora"),
    )


def run_recipe(recipe: Recipe, log: Any = print) -> dict[str, Any]:
    """Build the model, data and trainer a recipe names, train, save ``output_dir/final``."""
    from metamorph_train.data import Mixture
    from metamorph_train.trainer import Trainer

    t = recipe.train
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if t.meta_init and t.strategy == "fsdp" and rank > 0:  # rank 0 alone holds the weights
        with torch.device("meta"):
            objective, dataset_kind, cache_encoder = build_objective(recipe)
    else:
        objective, dataset_kind, cache_encoder = build_objective(recipe)
    trainable = VPIT_RECIPES.get(recipe.recipe)
    datasets = _datasets(recipe, dataset_kind, cache_encoder)
    weights = {name: w for name, (_, w) in datasets.items()}
    mixture = Mixture(
        {name: d for name, (d, _) in datasets.items()}, weights, seed=recipe.data.seed
    )
    trainer = Trainer(objective, mixture, recipe.train, trainable=trainable, log=log)
    summary = trainer.run()
    final = Path(recipe.train.output_dir) / "final"
    if trainer.strategy == "fsdp":
        # every rank takes part in gathering the shards; rank 0 loads them into a new,
        # unsharded copy of the model and saves that
        state = distributed.full_state_dict(trainer.model)
        if trainer.rank == 0:
            whole = build_objective(recipe)[0]
            whole.module.load_state_dict(state)
            whole.save(final)
    elif trainer.rank == 0:  # DDP replicas are identical; one writer
        objective.save(final)
    if trainer.world > 1:
        torch.distributed.barrier()
    errors: dict[str, int] = {}
    for d, _ in datasets.values():
        for k, v in d.errors.summary().items():
            errors[k] = errors.get(k, 0) + v
    return {**summary, "saved": str(final), "skipped": errors}


def build_objective(recipe: Recipe) -> tuple[Any, type, Any]:
    """The recipe's objective, its dataset class, and the encoder a feature cache must match."""
    torch.manual_seed(recipe.train.seed)  # new weights (projector, head, ...) from the seed
    if recipe.recipe in VPIT_RECIPES:
        return _vpit(recipe)
    build = {"decoder": _decoder, "encoder-pretrain": _siglip, "lm-pretrain": _causal_lm}
    return build[recipe.recipe](recipe)


def _vpit(recipe: Recipe) -> tuple[Any, type, Any]:
    from metamorph_core import MetaMorphModel
    from metamorph_train.data import ConversationDataset
    from metamorph_train.objectives import VPiTObjective

    if recipe.init_from:
        model = MetaMorphModel.from_pretrained(recipe.init_from)
    else:
        model = MetaMorphModel.from_config(recipe.model)
    if recipe.recipe == "lora":
        model.apply_lora(**(recipe.lora or {}))
    elif recipe.lora:
        raise ValueError(
            f"recipe key 'lora' is set but recipe is '{recipe.recipe}'; use recipe: lora"
        )
    t = recipe.train
    objective = VPiTObjective(model, t.pack_to, t.prompt_dropout, t.visual_input_noise)
    return objective, ConversationDataset, model.encoder


def _decoder(recipe: Recipe) -> tuple[Any, type, Any]:
    from metamorph_core import create
    from metamorph_core.config import ComponentSpec
    from metamorph_train.data import ImageDataset
    from metamorph_train.objectives import DecoderObjective

    m: DecoderModel = recipe.model
    enc = ComponentSpec.parse(m.encoder, "model.encoder")
    encoder = create("encoder", enc.name, **enc.kwargs)
    dec = ComponentSpec.parse(m.decoder, "model.decoder")
    kwargs = dict(dec.kwargs)
    kwargs.setdefault("token_dim", encoder.hidden_size)  # a saved decoder must agree
    kwargs.setdefault("num_tokens", encoder.num_tokens)
    decoder = create("decoder", dec.name, **kwargs)
    # with a feature cache the encoder only checks that the cache is its own
    live = None if recipe.data.feature_cache else encoder
    return DecoderObjective(decoder, live), ImageDataset, encoder


def _siglip(recipe: Recipe) -> tuple[Any, type, Any]:
    from metamorph_encoders.pretrain import build_siglip, small_siglip_config
    from metamorph_train.data import PairDataset
    from metamorph_train.data.records import check_pair_record
    from metamorph_train.objectives import SiglipObjective

    m: SiglipModel = recipe.model
    tokenizer = _tokenizer(
        recipe, m.tokenizer, m.vocab_size, check_pair_record, lambda r: r["caption"]
    )
    config = small_siglip_config(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **m.config
    )
    return SiglipObjective(build_siglip(config, seed=m.seed), tokenizer), PairDataset, None


def _causal_lm(recipe: Recipe) -> tuple[Any, type, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM

    from metamorph_train.data import TextDataset
    from metamorph_train.data.records import check_text_record, record_text
    from metamorph_train.objectives import CausalLMObjective

    m: CausalLMModel = recipe.model
    if m.pretrained:
        if m.config or m.tokenizer:
            raise ValueError(
                "model.pretrained continues from a saved model with its own config and "
                "tokenizer; drop model.config and model.tokenizer"
            )
        from transformers import AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(m.pretrained, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(m.pretrained)
        return CausalLMObjective(model, tokenizer, m.max_length), TextDataset, None
    tokenizer = _tokenizer(recipe, m.tokenizer, m.vocab_size, check_text_record, record_text)
    fields = {
        "vocab_size": len(tokenizer),
        "max_position_embeddings": m.max_length,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **m.config,
    }
    try:
        config = AutoConfig.for_model(m.architecture, **fields)
    except ValueError as e:
        raise ValueError(f"recipe key 'model.architecture': {e}") from e
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(m.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return CausalLMObjective(model, tokenizer, m.max_length), TextDataset, None


def _tokenizer(recipe: Recipe, given: str | None, vocab_size: int, check: Any, text_of: Any) -> Any:
    """``given``, or a tokenizer trained on the sources' text. A trained one is kept in
    ``output_dir/tokenizer`` so that a resumed run uses the very same one."""
    from transformers import AutoTokenizer

    from metamorph_train.data.records import iter_records
    from metamorph_train.data.stream import shard_paths
    from metamorph_train.tokenizer import train_tokenizer

    if given:
        return AutoTokenizer.from_pretrained(given)
    kept = Path(recipe.train.output_dir) / "tokenizer"
    if (kept / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(kept))

    def texts() -> Any:
        for s in recipe.data.sources:
            for path in shard_paths(s.path) if s.streaming else [Path(s.path)]:
                for record in iter_records(path, "skip", {}, check):
                    yield text_of(record)

    tokenizer = train_tokenizer(texts(), vocab_size)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:  # every rank trains the same tokenizer from the same text; one writes it
        from metamorph_core.checkpoint import atomic_directory

        with atomic_directory(kept, "tokenizer") as tmp:
            tokenizer.save_pretrained(str(tmp))
    return tokenizer


def _datasets(recipe: Recipe, kind: type, encoder: Any) -> dict[str, tuple[Any, float]]:
    from metamorph_train.cache import FeatureCache

    cache = None
    if recipe.data.feature_cache:
        if encoder is None:
            raise ValueError(f"recipe '{recipe.recipe}' reads pixels; drop data.feature_cache")
        # the decoder may learn from tokens an LLM predicted (metamorph cache-features
        # --predicted-by); everything else needs the encoder's own tokens of the images
        allow = recipe.recipe == "decoder"
        cache = FeatureCache(recipe.data.feature_cache, encoder, allow_predicted=allow)
    out = {}
    for i, s in enumerate(recipe.data.sources):
        name = s.name or f"source{i}"
        if name in out:
            raise ValueError(f"two sources are named '{name}'; give each a distinct name")
        dataset = kind(
            s.path,
            s.image_root,
            recipe.data.on_error,
            cache,
            streaming=s.streaming,
            seed=recipe.data.seed * 7919 + i,
        )
        out[name] = (dataset, s.weight)
    return out
