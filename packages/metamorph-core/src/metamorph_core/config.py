"""Configuration of a unified model: which components, by registry name and keyword config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ComponentSpec:
    """A registry name plus the keyword arguments its factory receives."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, value: ComponentSpec | str | dict[str, Any], where: str) -> ComponentSpec:
        if isinstance(value, ComponentSpec):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, dict) and set(value) <= {"name", "kwargs"} and "name" in value:
            return cls(value["name"], dict(value.get("kwargs") or {}))
        raise ValueError(
            f"{where}: expected a component name or {{'name': ..., 'kwargs': {{...}}}}, got {value!r}"
        )


@dataclass
class MetaMorphConfig:
    """What ``MetaMorphModel.from_config`` assembles.

    The defaults are the paper's: projector ``mlp2x_gelu`` (Linear GELU Linear), head ``mlp``
    (Linear GELU Linear), cosine visual loss with weight 1. The default template is ``auto``
    with fallback ``llama3``: the backbone tokenizer's own chat template when it has one, else
    the paper's ``llama3``. A saved config records its template, so a checkpoint that names
    ``llama3`` keeps it. Projector and head dimensions default to the encoder's and backbone's
    widths.
    """

    encoder: ComponentSpec
    backbone: ComponentSpec
    projector: ComponentSpec = field(default_factory=lambda: ComponentSpec("mlp2x_gelu"))
    # the paper's head: every training script of the research code builds Linear(d, d) GELU
    # Linear(d, c) (VISION_HEAD_TYPE="mlp"; docs/method.md)
    head: ComponentSpec = field(default_factory=lambda: ComponentSpec("mlp"))
    visual_loss: ComponentSpec = field(default_factory=lambda: ComponentSpec("cosine"))
    visual_loss_weight: float = 1.0
    text_loss_weight: float = 1.0
    template: ComponentSpec = field(
        default_factory=lambda: ComponentSpec("auto", {"fallback": "llama3"})
    )
    decoder: ComponentSpec | None = None  # a visual decoder turning predicted tokens into pixels
    freeze_encoder: bool = True
    max_length: int | None = None  # None: the backbone's own maximum
    truncation: bool = False
    # what an answer says before a generated image when the caller does not say
    # (generate_image): the paper's training data answers "Here is an image based on your
    # request: <image>"
    image_answer_prefix: str = "Here is an image based on your request: "

    def __post_init__(self) -> None:
        for f in ("encoder", "backbone", "projector", "head", "visual_loss", "template"):
            setattr(self, f, ComponentSpec.parse(getattr(self, f), f"MetaMorphConfig.{f}"))
        if self.decoder is not None:
            self.decoder = ComponentSpec.parse(self.decoder, "MetaMorphConfig.decoder")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetaMorphConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown MetaMorphConfig keys {unknown}; known keys are {sorted(known)}"
            )
        return cls(**data)
