"""Recipes: YAML files naming an objective and components by registry key, with dotted
command-line overrides (``train.lr=1e-4``), parsed into typed dataclasses. Unknown keys fail
naming their path; keys of the old layout fail naming their new place.

```yaml
objective:                  # a registered objective (metamorph plugins lists them) and its options
  name: vpit                # vpit | decoder | siglip | causal-lm | a third party's
  policy: full              # vpit: which parameters train: full (stage 2) | projector (stage 1) | lora
model:                      # the objective's model section; for vpit MetaMorphConfig fields
  encoder: {name: siglip, kwargs: {pretrained: google/siglip-so400m-patch14-384}}
  backbone: {name: llama, kwargs: {pretrained: meta-llama/Llama-3.1-8B-Instruct, dtype: bfloat16}}
  projector: mlp2x_gelu
data:
  sources:                  # a file, or with streaming: true a directory / glob of JSONL shards
    - {path: data/train.jsonl, image_root: data/images, weight: 1.0}
  on_error: raise           # or skip (counted in the summary)
  feature_cache: null       # a `metamorph cache-features` directory
train:                      # metamorph_train.trainer.TrainerConfig fields
  output_dir: runs/vpit
  steps: 1000
```

``objective: vpit`` (a bare name) takes the objective's defaults. Each objective documents its
section and its ``model`` (:mod:`metamorph_train.objectives`); :func:`run_recipe`
(:mod:`metamorph_train.runner`) trains and writes ``output_dir/final``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metamorph_core.errors import ComponentNotFoundError
from metamorph_train.trainer_config import TrainerConfig

# the formats of metamorph_train.data.formats.FORMATS (kept here: parsing imports no torch)
SOURCE_FORMATS = ("jsonl", "webdataset", "parquet", "hf")


@dataclass
class Source:
    """One data source. ``format``: ``jsonl`` (``path`` a .json/.jsonl file, or with
    ``streaming: true`` a directory or glob of .jsonl shards), ``webdataset`` (tar shards: a
    brace pattern such as ``data/shard-{000000..000099}.tar``, a directory or a glob),
    ``parquet`` (files: a directory, glob or brace pattern) or ``hf`` (a ``datasets`` dataset
    saved with ``save_to_disk``, or local data files); layouts in
    :mod:`metamorph_train.data.sources`. The formats other than jsonl always stream:
    ``streaming`` is true for them (``streaming: false`` is refused) and false by default for
    jsonl."""

    path: str
    image_root: str = "."
    weight: float = 1.0
    name: str | None = None
    streaming: bool | None = None  # None: the format's default (see above)
    format: str = "jsonl"

    def __post_init__(self) -> None:
        if self.format not in SOURCE_FORMATS:
            raise ValueError(
                f"data source '{self.path}': unknown format '{self.format}'; use one of "
                f"{', '.join(SOURCE_FORMATS)}"
            )
        if self.format != "jsonl" and self.streaming is False:
            raise ValueError(
                f"data source '{self.path}': format '{self.format}' always streams; drop "
                "'streaming: false' (only jsonl sources are read whole)"
            )
        if self.streaming is None:
            self.streaming = self.format != "jsonl"


@dataclass
class DataConfig:
    sources: list[Source] = field(default_factory=list)
    on_error: str = "raise"
    feature_cache: str | None = None
    seed: int = 0
    # data-loader worker processes per rank that read and preprocess images (0: the training
    # process), each prefetch micro-batches ahead; the data drawn does not depend on either
    num_workers: int = 0
    prefetch: int = 2
    # MiB of decoded image files each process keeps in memory (0: none), shared by the
    # sources: a small set drawn for many epochs is read and decoded once (ImageMemory)
    image_memory_mb: float = 0
    # held-out sources (the Source keys; read whole, not streamed) that validation scores
    # every train.eval_every steps; unnamed ones are called eval0, eval1, ...
    eval_sources: list[Source] = field(default_factory=list)

    def __post_init__(self) -> None:
        mb = self.image_memory_mb
        if isinstance(mb, bool) or not isinstance(mb, (int, float)) or not mb >= 0:
            raise ValueError(
                "recipe key 'data.image_memory_mb' is the MiB of decoded images kept in memory "
                f"(>= 0; 0: none), got {self.image_memory_mb!r}"
            )
        if self.num_workers < 0 or self.prefetch < 1:
            raise ValueError(
                "recipe keys 'data.num_workers' (>= 0; 0: read in the training process) and "
                f"'data.prefetch' (>= 1) got {self.num_workers} and {self.prefetch}"
            )
        typed = [
            s if isinstance(s, Source) else _typed(Source, s, f"data.eval_sources[{i}]")
            for i, s in enumerate(self.eval_sources or [])
        ]
        for i, s in enumerate(typed):
            if getattr(s, "streaming", False):
                raise ValueError(
                    f"recipe key 'data.eval_sources[{i}]' streams (streaming: true, or a format "
                    "other than jsonl); held-out sources are read whole (map-style): give a "
                    "jsonl file with streaming: false"
                )
        self.eval_sources = typed


@dataclass
class Recipe:
    """A parsed recipe: the objective's registry name and typed options, its model section,
    data and trainer settings."""

    objective: str
    options: Any  # the objective's Options dataclass
    model: Any  # the objective's Model dataclass, or a mapping (vpit: MetaMorphConfig fields)
    data: DataConfig
    train: TrainerConfig

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data (overrides applied, every default filled in):
        what ``output_dir/recipe.yaml`` holds; :func:`parse_recipe` of it gives this recipe
        back."""
        from metamorph_core.checkpoint import jsonable

        def plain(section: Any) -> Any:
            return jsonable(
                dataclasses.asdict(section) if dataclasses.is_dataclass(section) else section
            )

        return {
            "objective": {"name": self.objective, **plain(self.options)},
            "model": plain(self.model),
            "data": plain(self.data),
            "train": plain(self.train),
        }


# keys of the layout before objectives were plugins -> where they went
_OLD_RECIPES = {
    "full": "objective: {name: vpit, policy: full}",
    "projector": "objective: {name: vpit, policy: projector}",
    "lora": "objective: {name: vpit, policy: lora, lora: {r: 16, alpha: 32}}",
    "decoder": "objective: decoder",
    "encoder-pretrain": "objective: siglip",
    "lm-pretrain": "objective: causal-lm",
}
_MOVED_TO_OBJECTIVE = {
    "init_from": "objective.init_from",
    "lora": "objective.lora (with objective.policy: lora)",
}
_MOVED_FROM_TRAIN = ("pack_to", "prompt_dropout", "visual_input_noise")


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
    if isinstance(tree.get("objective"), str):  # so that objective.policy=... can override
        tree["objective"] = {"name": tree["objective"]}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override '{item}' must look like key.path=value")
        _set(tree, key, yaml.safe_load(raw))
    return parse_recipe(tree, where=str(path))


def parse_recipe(tree: dict[str, Any], where: str = "recipe") -> Recipe:
    """A recipe from its mapping (what :func:`load_recipe` reads from YAML): the objective is
    looked up in the registry and its sections typed by the objective's ``Options`` and
    ``Model``."""
    tree = dict(tree)
    _refuse_old_layout(tree)
    top = {"objective", "model", "data", "train"}
    unknown = sorted(set(tree) - top)
    if unknown:
        raise ValueError(
            f"unknown recipe key(s) {unknown} in '{where}'; top-level keys are {sorted(top)}"
        )
    section = tree.get("objective")
    if isinstance(section, str):
        section = {"name": section}
    cls = _objective_class(section, where)
    options = dict(section)
    name = options.pop("name")
    model: Any = tree.get("model") or {}
    if cls.Model is not None:
        model = _typed(cls.Model, dict(model), "model")
    elif not isinstance(model, dict):
        raise ValueError(f"recipe key 'model' must be a mapping, got {model!r}")
    data = dict(tree.get("data") or {})
    data["sources"] = [
        _typed(Source, s, f"data.sources[{i}]") for i, s in enumerate(data.get("sources") or [])
    ]
    if not data["sources"]:
        raise ValueError("recipe key 'data.sources' needs at least one source")
    return Recipe(
        objective=name,
        options=_typed(cls.Options, options, "objective"),
        model=model,
        data=_typed(DataConfig, data, "data"),
        train=_typed(TrainerConfig, tree.get("train") or {}, "train"),
    )


def objective_class(name: str) -> Any:
    """The :class:`~metamorph_train.objectives.Objective` class registered as ``name``."""
    from metamorph_core.plugins.registry import get_registry

    entry, _ = get_registry().get("objective", name)
    return entry.load_factory()


def _objective_class(section: Any, where: str) -> Any:
    from metamorph_core.plugins.registry import get_registry

    known = get_registry().names("objective")
    if not isinstance(section, dict) or not isinstance(section.get("name"), str):
        raise ValueError(
            f"recipe '{where}' needs an objective: 'objective: NAME' or 'objective: {{name: "
            f"NAME, ...}}', NAME one of {known}"
        )
    try:
        return objective_class(section["name"])
    except ComponentNotFoundError as e:
        raise ValueError(f"recipe key 'objective.name' in '{where}': {e}") from e


def _refuse_old_layout(tree: dict[str, Any]) -> None:
    """Keys of the layout before objectives were plugins fail naming their new place."""
    if "recipe" in tree:
        old = tree["recipe"]
        new = _OLD_RECIPES.get(old, "objective: NAME")
        raise ValueError(
            f"recipe key 'recipe: {old}' is now 'objective': write `{new}` instead "
            "(VPiT's options, lora and init_from included, live in the objective section)"
        )
    for key, new in _MOVED_TO_OBJECTIVE.items():
        if key in tree:
            raise ValueError(f"recipe key '{key}' moved to {new}")
    moved = [k for k in _MOVED_FROM_TRAIN if k in (tree.get("train") or {})]
    if moved:
        raise ValueError(
            f"recipe key(s) {[f'train.{k}' for k in moved]} moved to the VPiT objective's "
            f"section: {', '.join(f'objective.{k}' for k in moved)}"
        )
