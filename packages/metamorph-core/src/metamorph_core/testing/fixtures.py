"""pytest fixtures for tests of metamorph and of third-party plugins: tiny real backbones saved
with ``save_pretrained`` and unified models built on them. Import them into a ``conftest.py``::

    from metamorph_core.testing.fixtures import backbone_dirs, hub_cache, make_model  # noqa: F401
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metamorph_core.model import MetaMorphModel
from metamorph_core.testing.hub import offline_hub
from metamorph_core.testing.tiny import save_tiny_backbone, tiny_model_config


@pytest.fixture(scope="session")
def backbone_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny saved backbone per family: ``{"llama": DIR, "qwen2": DIR, "qwen3": DIR}``."""
    root = tmp_path_factory.mktemp("backbones")
    return {fam: save_tiny_backbone(root / fam, fam, seed=1) for fam in ("llama", "qwen2", "qwen3")}


@pytest.fixture
def make_model(backbone_dirs):
    """``make_model(family="llama", **config_overrides)``: a seeded tiny unified model."""

    def make(family: str = "llama", **overrides) -> MetaMorphModel:
        torch.manual_seed(0)
        return MetaMorphModel.from_config(tiny_model_config(backbone_dirs[family], **overrides))

    return make


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hub cache, with the Hub client offline, for one test: fill it with
    :func:`metamorph_core.testing.hub.populate_hub_cache` and load repo ids from it."""
    return offline_hub(monkeypatch, tmp_path / "hub-cache")
