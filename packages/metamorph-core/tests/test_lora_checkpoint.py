"""A LoRA checkpoint refers to its base model: a local base as a path relative to the
checkpoint (so both move together), a Hub base by id and revision (loaded from the cache)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from metamorph_core import MetaMorphModel
from metamorph_core.errors import CheckpointError
from metamorph_core.testing import populate_hub_cache, save_tiny_backbone, tiny_model_config
from metamorph_core.testing.samples import generation, understanding

pytest.importorskip("peft")

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def lora_model(base_dir, source=None, **backbone_kwargs) -> MetaMorphModel:
    """A tiny model on the saved backbone ``base_dir``, named as ``source`` (a path or Hub id;
    default ``base_dir``), with LoRA whose weights are moved off zero so that merging changes
    the backbone."""
    torch.manual_seed(0)
    config = tiny_model_config(base_dir)
    config.backbone.kwargs.update(pretrained=str(source or base_dir), **backbone_kwargs)
    model = MetaMorphModel.from_config(config)
    model.apply_lora(**LORA)
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model.eval()


def backbone_entry(path):
    return json.loads((path / "config.json").read_text())["components"]["backbone"]


def merged_state(model: MetaMorphModel) -> dict[str, torch.Tensor]:
    model.merge_lora()
    return {k: v.clone() for k, v in model.backbone.causal_lm.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_local_base_is_relative_and_moves_with_the_checkpoint(tmp_path):
    work = tmp_path / "work"
    base = save_tiny_backbone(work / "base", seed=1)
    model = lora_model(base)
    path = model.save_pretrained(work / "runs" / "lora")
    assert backbone_entry(path)["load_kwargs"]["pretrained"] == "<checkpoint>/../../base"
    batch = model.prepare_batch([understanding(), generation()])
    with torch.no_grad():
        loss = model(**batch).loss
    expected = merged_state(model)

    shutil.move(work, tmp_path / "moved")  # the parent holding both
    loaded = MetaMorphModel.from_pretrained(tmp_path / "moved" / "runs" / "lora").eval()
    assert loaded.backbone.lora is not None
    with torch.no_grad():
        assert torch.equal(loaded(**batch).loss, loss)
    assert same(merged_state(loaded), expected)


def test_base_given_by_a_relative_path_survives_a_change_of_directory(tmp_path, monkeypatch):
    base = save_tiny_backbone(tmp_path / "base", seed=1)
    monkeypatch.chdir(tmp_path)
    model = lora_model(base, "base")
    monkeypatch.chdir(tmp_path / "base")  # 'base' no longer names it; the model remembers
    path = model.save_pretrained(tmp_path / "lora")
    assert backbone_entry(path)["load_kwargs"]["pretrained"] == "<checkpoint>/../base"
    assert MetaMorphModel.from_pretrained(path).backbone.lora is not None


def test_hub_base_is_recorded_by_id_and_revision_and_loads_offline(hub_cache, tmp_path):
    base = save_tiny_backbone(tmp_path / "base", seed=1)
    populate_hub_cache(hub_cache, "org/base", base, revision="v1")
    model = lora_model(base, "org/base", revision="v1")
    path = model.save_pretrained(tmp_path / "lora")
    load_kwargs = backbone_entry(path)["load_kwargs"]
    assert load_kwargs["pretrained"] == "org/base" and load_kwargs["revision"] == "v1"
    expected = merged_state(model)
    shutil.rmtree(base)  # only the Hub cache holds the base now
    loaded = MetaMorphModel.from_pretrained(path)
    assert same(merged_state(loaded), expected)
    shutil.rmtree(hub_cache / "models--org--base")
    with pytest.raises(CheckpointError) as e:
        MetaMorphModel.from_pretrained(path)
    message = str(e.value)
    assert "cannot load the LoRA adapter's base model 'org/base' at revision 'v1'" in message
    assert "set components.backbone.load_kwargs.pretrained in its config.json" in message


def test_a_missing_base_is_a_clear_error(tmp_path):
    base = save_tiny_backbone(tmp_path / "base", seed=1)
    path = lora_model(base).save_pretrained(tmp_path / "runs" / "lora")
    shutil.rmtree(base)
    with pytest.raises(CheckpointError) as e:
        MetaMorphModel.from_pretrained(path)
    message = str(e.value)
    assert "'<checkpoint>/../../base' is a path relative to the checkpoint" in message
    assert str(tmp_path / "base") in message and "move both together" in message
    assert "components.backbone.load_kwargs.pretrained" in message


def test_a_damaged_base_names_its_file(tmp_path):
    base = save_tiny_backbone(tmp_path / "base", seed=1)
    path = lora_model(base).save_pretrained(tmp_path / "runs" / "lora")
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as e:
        MetaMorphModel.from_pretrained(path)
    message = str(e.value)
    needs = "needs the backbone's pretrained '<checkpoint>/../../base'"
    assert f"checkpoint '{path}' {needs}" in message
    assert "model.safetensors is truncated: 1,000 bytes, but its header" in message
    assert f"('{weights}')" in message


def test_saving_lora_over_a_deleted_base_directory_is_refused(tmp_path):
    base = save_tiny_backbone(tmp_path / "base", seed=1)
    model = lora_model(base)
    shutil.rmtree(base)
    with pytest.raises(ValueError, match="base model directory .* is gone; put it back, or merge"):
        model.save_pretrained(tmp_path / "lora")
    assert not (tmp_path / "lora").exists()
