"""Recipes: YAML files naming components by registry key, with dotted command-line overrides
(``train.lr=1e-4``), parsed into typed dataclasses. Unknown keys fail naming their path.

```yaml
recipe: full                # full: all but the encoder (stage 2); projector: projector only
                            # (stage 1); lora: LoRA on the LLM + projector + head
lora: {r: 16, alpha: 32}    # recipe lora only
model:                      # metamorph_core.MetaMorphConfig fields
  encoder: {name: siglip, kwargs: {pretrained: google/siglip-so400m-patch14-384}}
  backbone: {name: llama, kwargs: {pretrained: meta-llama/Llama-3.1-8B-Instruct, dtype: bfloat16}}
  projector: mlp2x_gelu
  head: mlp2x_gelu
init_from: null             # or a MetaMorph checkpoint to continue from (e.g. stage 1's)
data:
  sources:
    - {path: data/train.jsonl, image_root: data/images, weight: 1.0}
  on_error: raise           # or skip (counted in the summary)
  feature_cache: null       # a `metamorph cache-features` directory
train:                      # metamorph_train.trainer.TrainerConfig fields
  output_dir: runs/vpit
  steps: 1000
```
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

from metamorph_train.trainer import TrainerConfig

# recipe -> which parameters train (after LoRA is applied, for "lora")
RECIPES = {
    "full": lambda name, p: not name.startswith(("encoder.", "decoder.")),
    "projector": lambda name, p: name.startswith("projector."),
    "lora": lambda name, p: (
        name.startswith(("projector.", "head."))
        or (name.startswith("backbone.") and p.requires_grad)
    ),
}


@dataclass
class Source:
    path: str
    image_root: str = "."
    weight: float = 1.0
    name: str | None = None


@dataclass
class DataConfig:
    sources: list[Source] = field(default_factory=list)
    on_error: str = "raise"
    feature_cache: str | None = None
    seed: int = 0


@dataclass
class Recipe:
    model: dict[str, Any]
    data: DataConfig
    train: TrainerConfig
    recipe: str = "full"
    init_from: str | None = None
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
    if tree.get("recipe", "full") not in RECIPES:
        raise ValueError(f"unknown recipe '{tree['recipe']}'; known: {sorted(RECIPES)}")
    data = dict(tree.get("data") or {})
    data["sources"] = [
        _typed(Source, s, f"data.sources[{i}]") for i, s in enumerate(data.get("sources") or [])
    ]
    if not data["sources"]:
        raise ValueError("recipe key 'data.sources' needs at least one source")
    return Recipe(
        model=dict(tree.get("model") or {}),
        data=_typed(DataConfig, data, "data"),
        train=_typed(TrainerConfig, tree.get("train") or {}, "train"),
        recipe=tree.get("recipe", "full"),
        init_from=tree.get("init_from"),
        lora=tree.get("lora"),
    )


def run_recipe(recipe: Recipe, log: Any = print) -> dict[str, Any]:
    """Build the model, data and trainer a recipe names, train, save ``output_dir/final``."""
    from metamorph_core import MetaMorphModel
    from metamorph_train.cache import FeatureCache
    from metamorph_train.data import ConversationDataset, Mixture
    from metamorph_train.trainer import Trainer

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
    cache = (
        FeatureCache(recipe.data.feature_cache, model.encoder)
        if recipe.data.feature_cache
        else None
    )
    datasets, weights = {}, {}
    for i, s in enumerate(recipe.data.sources):
        name = s.name or f"source{i}"
        datasets[name] = ConversationDataset(s.path, s.image_root, recipe.data.on_error, cache)
        weights[name] = s.weight
    mixture = Mixture(datasets, weights, seed=recipe.data.seed)
    if torch.distributed.is_initialized() and recipe.train.strategy == "fsdp":
        raise ValueError(
            "recipes under FSDP2 cannot write their final checkpoint yet (it needs a gathered "
            "state dict); use train.strategy=ddp, or the Trainer API, whose step checkpoints "
            "are gathered"
        )
    pick = RECIPES[recipe.recipe]
    trainer = Trainer(model, mixture, recipe.train, trainable=pick, log=log)
    summary = trainer.run()
    final = Path(recipe.train.output_dir) / "final"
    if trainer.rank == 0:  # DDP replicas are identical; one writer
        model.save_pretrained(final)
    if trainer.world > 1:
        torch.distributed.barrier()
    errors: dict[str, int] = {}
    for d in datasets.values():
        for k, v in d.errors.summary().items():
            errors[k] = errors.get(k, 0) + v
    return {**summary, "saved": str(final), "skipped": errors}
