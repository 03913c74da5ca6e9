"""The model card (``README.md``) that ``save_pretrained`` writes into a checkpoint: YAML front
matter the Hugging Face Hub reads (library, tags, base model, license, datasets), then what
the model is (its components by registry name, settings and source), how it was trained when
that is known (:class:`ModelCardData`), and how to load it.

The card is a pure function of the model and its card data: no dates, no machine names beyond
the sources the config records, so saving the same model twice writes the same bytes. Loading
never reads it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from metamorph_core import __version__
from metamorph_core.checkpoint import jsonable
from metamorph_core.errors import ComponentNotFoundError
from metamorph_core.hub import is_hub_id

CARD_NAME = "README.md"
KINDS = ("encoder", "projector", "backbone", "head", "decoder")
_PLAIN = re.compile(r"[A-Za-z_][\w./-]*")  # YAML scalars that need no quotes
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n"}
# where this machine reads a component's source from, not what the model is: left off the card
_MACHINE_KWARGS = ("cache_dir", "local_files_only", "token")


@dataclass
class ModelCardData:
    """What a model card says beyond the model itself. Every field is optional; sections with
    nothing to say are left out. metamorph-train fills it from a recipe.

    ``title``: the card's heading; ``description``: a paragraph under it; ``license``: an SPDX
    id or Hub license name (else taken from the components that declare one); ``tags``: Hub tags
    added to MetaMorph's own; ``datasets``: Hub dataset ids (front matter and the Data section);
    ``training``: settings of the training run (objective, policy, steps, learning rate, batch
    size ...; nested dicts are shown with dotted keys); ``data``: the training data, one entry a
    source (a string, or a dict such as ``{"path": ..., "weight": ..., "task": ...}``);
    ``metrics``: results by name (nested dicts dotted, e.g. ``{"mmbench": {"accuracy": 0.61}}``).
    """

    title: str | None = None
    description: str | None = None
    license: str | None = None
    tags: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)
    data: list[Any] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, value: ModelCardData | dict[str, Any] | None) -> ModelCardData:
        """``value`` as card data: a ``ModelCardData``, a dict of its fields (unknown keys are
        an error naming the known ones) or ``None`` (empty)."""
        if isinstance(value, ModelCardData):
            return value
        if value is None:
            return cls()
        if not isinstance(value, dict):
            raise TypeError(f"card_data must be a ModelCardData or a dict, got {value!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown model card fields {unknown}; known: {sorted(known)}")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set, JSON-ready (what ``config.json`` keeps as ``card_data``)."""
        return {k: v for k, v in jsonable(dataclasses.asdict(self)).items() if v}


def render_model_card(model: Any, card: ModelCardData, repo_id: str | None = None) -> str:
    """The ``README.md`` text of ``model`` (a :class:`~metamorph_core.model.MetaMorphModel`);
    ``repo_id`` is the name the usage example loads (default a placeholder)."""
    kinds = [k for k in KINDS if k in model.present_kinds()]
    specs = {k: getattr(model.config, k) for k in kinds}
    lora = getattr(model.backbone, "lora", None)
    base = specs["backbone"].kwargs.get("pretrained")
    license_, license_note = _license(model, kinds, card)
    meta: dict[str, Any] = {"library_name": "metamorph"}
    if license_:
        meta["license"] = license_
    if isinstance(base, str) and is_hub_id(base):
        meta["base_model"] = base
        if lora:
            meta["base_model_relation"] = "adapter"
    meta["pipeline_tag"] = "any-to-any" if "decoder" in kinds else "image-text-to-text"
    tags = ["metamorph", "unified-multimodal", "vpit", "image-to-text"]
    tags += ["text-to-image"] if "decoder" in kinds else []
    tags += ["lora"] if lora else []
    meta["tags"] = tags + [t for t in card.tags if t not in tags]
    if card.datasets:
        meta["datasets"] = list(card.datasets)

    parts = ["---\n" + "".join(_yaml(k, v) for k, v in meta.items()) + "---"]
    parts.append(f"# {card.title or (repo_id or 'MetaMorph model').rsplit('/', 1)[-1]}")
    parts.append(card.description or _about(kinds))
    parts.append(_components(model, kinds, specs, lora))
    if card.training:
        parts.append("## Training\n\n" + _table(("setting", "value"), _flat(card.training)))
    if card.data or card.datasets:
        items = [f"- {_source(d)}" for d in card.data]
        items += [f"- `{d}` (Hub dataset)" for d in card.datasets if d not in card.data]
        parts.append("## Data\n\n" + "\n".join(items))
    if card.metrics:
        parts.append("## Metrics\n\n" + _table(("metric", "value"), _flat(card.metrics)))
    if license_note:
        parts.append("## License\n\n" + license_note)
    parts.append(_usage(model, kinds, repo_id))
    return "\n\n".join(parts) + "\n"


def _about(kinds: list[str]) -> str:
    text = (
        "A unified multimodal model trained by Visual-Predictive Instruction Tuning (VPiT; Tong "
        "et al. 2024, arXiv 2412.14164) and saved by MetaMorph: a vision encoder's tokens enter "
        "the language model through a projector, and the model predicts text tokens and, "
        "through its vision head, visual tokens"
    )
    if "decoder" in kinds:
        return text + "; a diffusion decoder turns predicted visual tokens into images."
    return text + ". It has no visual decoder, so it answers in text and visual tokens."


def _components(model: Any, kinds: list[str], specs: dict[str, Any], lora: Any) -> str:
    rows = []
    for kind in kinds:
        kwargs = jsonable(specs[kind].kwargs)
        source = kwargs.pop("pretrained", None)
        for key in _MACHINE_KWARGS:
            kwargs.pop(key, None)
        at = ", ".join(f"{k} `{kwargs.pop(k)}`" for k in ("subfolder", "revision") if kwargs.get(k))
        module = getattr(model, kind)
        params = _count(sum(p.numel() for p in module.parameters()))
        if kind == "encoder" and model.config.freeze_encoder:
            params += " (frozen)"
        rows.append(
            (
                kind,
                f"`{specs[kind].name}`",
                _settings(kwargs),
                "built from its settings"
                if source is None
                else f"`{source}`" + (f" ({at})" if at else ""),
                params,
            )
        )
    c = model.config
    lines = [
        "## Components",
        _table(("part", "registry name", "settings", "source", "parameters"), rows),
        f"The encoder gives {model.num_image_tokens} visual tokens of width "
        f"{model.encoder.hidden_size} per image; the backbone's hidden size is "
        f"{model.backbone.hidden_size}. Chat template `{c.template.name}`; visual loss "
        f"`{c.visual_loss.name}` (weight {c.visual_loss_weight}), text loss weight "
        f"{c.text_loss_weight}. Saved by metamorph-core {__version__}.",
    ]
    if lora:
        lines.append(
            f"The backbone is stored as a LoRA adapter (r {lora['r']}, alpha {lora['alpha']}, "
            f"dropout {lora['dropout']}, target modules {_value(lora['target_modules'])}) with "
            "its trained image-token rows, over its base model, which loading reads from the "
            "source above (a Hub id, or a path relative to this directory); "
            "`metamorph merge-lora CKPT OUT` writes a full checkpoint."
        )
    return "\n\n".join(lines)


def _license(model: Any, kinds: list[str], card: ModelCardData) -> tuple[str | None, str]:
    """The front matter's license and a note for the License section ('' for none)."""
    if card.license:
        return card.license, ""
    declared = {k: getattr(getattr(model, k), "license", None) for k in kinds}
    known = {k: v for k, v in declared.items() if v}
    if not known:
        return None, (
            "Not recorded. The licenses of the components' sources (see Components) apply to "
            "this model; check them before use."
        )
    if len(set(known.values())) == 1 and len(known) == len(kinds):
        return next(iter(known.values())), ""
    listed = "; ".join(f"{k}: {v}" for k, v in known.items())
    return "other", (
        f"The components' licenses differ or are partly unknown ({listed}); each applies to its "
        "part of this model, and the components not listed carry their sources' licenses."
    )


def _usage(model: Any, kinds: list[str], repo_id: str | None) -> str:
    from metamorph_core.plugins.registry import get_registry

    dists = {"metamorph-core[hub]"}
    for kind in kinds:
        try:
            entry, _ = get_registry().get(kind, getattr(model.config, kind).name)
        except ComponentNotFoundError:
            continue
        if not entry.distribution.startswith("<") and entry.distribution != "metamorph-core":
            dists.add(entry.distribution)
    name = repo_id or "ORG/NAME or a local directory"
    code = [
        "from metamorph_core import MetaMorphModel",
        "",
        f'model = MetaMorphModel.from_pretrained("{name}").eval()',
        '(answer,) = model.generate("<image>\\nWhat is in this image?", ["photo.jpg"])',
        "print(answer.text)",
    ]
    if "decoder" in kinds:
        code += [
            '(result,) = model.generate_image("A red square.", decode_images=True)',
            'result.pil_images[0].save("square.png")',
        ]
    install = " ".join(f"'{d}'" if "[" in d else d for d in sorted(dists))
    return (
        "## Usage\n\n```bash\npip install "
        + install
        + "\n```\n\n```python\n"
        + "\n".join(code)
        + "\n```\n\nThe files: `config.json` (the components by registry name and settings), "
        "`model.safetensors` (the parts stored by the model), and a subfolder per component "
        "that saves itself (`backbone/` in transformers format"
        + (", `decoder/` in the Stable Diffusion layout" if "decoder" in kinds else "")
        + "). Nothing is unpickled on loading."
    )


# -- formatting --------------------------------------------------------------------------------
def _yaml(key: str, value: Any) -> str:
    if isinstance(value, list):
        return f"{key}:\n" + "".join(f"- {_scalar(v)}\n" for v in value)
    return f"{key}: {_scalar(value)}\n"


def _scalar(value: Any) -> str:
    text = str(value)
    if isinstance(value, str) and _PLAIN.fullmatch(text) and text.lower() not in _YAML_WORDS:
        return text
    return json.dumps(value)  # JSON scalars are YAML


def _count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _settings(kwargs: dict[str, Any]) -> str:
    """Short ``key=value`` pairs; components named ``{"name": ...}`` show their name, other
    structures their size."""
    shown = []
    for key in sorted(kwargs):
        value = kwargs[key]
        if isinstance(value, dict) and "name" in value:
            text = str(value["name"])
        elif isinstance(value, dict):
            text = f"{{{len(value)} keys}}"
        else:
            text = _value(value)
        if len(text) > 40:
            text = text[:37] + "..."
        shown.append(f"{key}={text}")
    return ", ".join(f"`{s}`" for s in shown) if shown else "defaults"


def _flat(data: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for key in sorted(data):
        value = data[key]
        if isinstance(value, dict) and value:
            rows += _flat(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", _value(value)))
    return rows


def _source(item: Any) -> str:
    if not isinstance(item, dict):
        return f"`{item}`"
    key = next((k for k in ("name", "path", "dataset") if k in item), None)
    rest = ", ".join(f"{k} {_value(v)}" for k, v in sorted(item.items()) if k != key)
    head = f"`{item[key]}`" if key is not None else ""
    return f"{head} ({rest})" if head and rest else head or rest


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(tuple("---" for _ in header)), *map(line, rows)])
