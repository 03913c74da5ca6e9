"""QLoRA: `objective.lora.quantize: nf4` loads the LLM's linear weights in 4-bit NF4 (double
quantisation, bitsandbytes), trains LoRA, the image tokens' rows, projector and head over them;
the checkpoint is the adapter with the quantisation recorded, `merge-lora` merges into the
full-precision base; what cannot work says so."""

from __future__ import annotations

import importlib
import json
import os
import sys

import pytest
import torch
import yaml
from backbone_matrix import write_colour_data
from safetensors.torch import load_file

from metamorph_core import MetaMorphModel, create
from metamorph_core.cli import main as cli
from metamorph_core.testing import save_tiny_backbone
from metamorph_train.recipe import load_recipe

# CI installs the extra, so a missing bitsandbytes fails there instead of skipping
bnb = importlib.import_module("bitsandbytes") if os.environ.get("CI") else None
bnb = bnb or pytest.importorskip("bitsandbytes")

R, ALPHA = 8, 16


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A QLoRA recipe trained through `metamorph train`: (root, base backbone, final)."""
    root = tmp_path_factory.mktemp("qlora")
    data = write_colour_data(root / "data")
    backbone = save_tiny_backbone(root / "llm", "llama", hidden_size=64, seed=1)
    recipe = {
        "objective": {
            "name": "vpit",
            "policy": "lora",
            "lora": {"r": R, "alpha": ALPHA, "quantize": "nf4"},
        },
        "model": {
            "encoder": {
                "name": "tiny-patch",
                "kwargs": {"image_size": 16, "hidden_size": 24, "num_tokens": 4},
            },
            "backbone": {"name": "llama", "kwargs": {"pretrained": str(backbone)}},
            "template": "llama3",
        },
        "data": {"sources": [{"path": str(data / "train.jsonl"), "image_root": str(data)}]},
        "train": {"output_dir": str(root / "run"), "steps": 6, "batch_size": 6, "lr": 1e-2},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert cli(["train", str(root / "recipe.yaml")]) == 0
    return root, backbone, root / "run" / "final"


def test_the_checkpoint_is_the_adapter_over_a_4bit_base_and_reloads_quantised(run):
    _, _, final = run
    assert (final / "backbone" / "adapter_model.safetensors").is_file()
    assert not (final / "backbone" / "model.safetensors").exists()
    meta = json.loads((final / "config.json").read_text())
    assert meta["components"]["backbone"]["load_kwargs"]["quantize"] == "nf4"
    model = MetaMorphModel.from_pretrained(final).eval()
    assert model.backbone.quantize == "nf4"
    q_proj = model.backbone.causal_lm.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    assert q_proj.base_layer.weight.dtype == torch.uint8  # packed 4-bit values
    adapter = load_file(final / "backbone" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # it trained
    (answer,) = model.generate(["What colour is this?"], max_new_tokens=4)
    assert answer.token_ids
    with pytest.raises(ValueError, match="nf4-quantised: merging LoRA into them would round"):
        model.merge_lora()


def test_merge_lora_merges_into_the_full_precision_base(run, capsys):
    root, backbone, final = run
    merged = root / "merged"
    assert cli(["merge-lora", str(final), str(merged)]) == 0
    assert "merging LoRA into the base in full precision" in capsys.readouterr().out
    meta = json.loads((merged / "config.json").read_text())
    assert "quantize" not in meta["components"]["backbone"]["load_kwargs"]
    weights = load_file(merged / "backbone" / "model.safetensors")
    base = load_file(backbone / "model.safetensors")
    adapter = load_file(final / "backbone" / "adapter_model.safetensors")
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        prefix = f"base_model.model.model.layers.1.{name}"
        a, b = adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"]
        key = f"model.layers.1.{name}.weight"
        expected = base[key] + (ALPHA / R) * b @ a
        assert torch.allclose(weights[key], expected, atol=1e-6)
        assert not torch.allclose(weights[key], base[key], atol=1e-6)
    model = MetaMorphModel.from_pretrained(merged)
    assert model.backbone.quantize is None and model.backbone.lora is None


def test_what_cannot_work_is_refused_clearly(run, tmp_path, monkeypatch):
    root, backbone, _ = run
    with pytest.raises(ValueError, match=r"objective.lora.quantize' = 'int8': use one of"):
        load_recipe(root / "recipe.yaml", ["objective.lora={r: 8, quantize: int8}"])
    cfg = {"model_type": "llama", "vocab_size": 330, "hidden_size": 64, "num_hidden_layers": 1}
    with pytest.raises(ValueError, match="quantize needs pretrained weights"):
        create("backbone", "llama", config=cfg, tokenizer=str(backbone), quantize="nf4")
    quantised = create("backbone", "llama", pretrained=str(backbone), quantize="nf4")
    with pytest.raises(ValueError, match="is saved as its LoRA adapter"):
        quantised.save_pretrained(tmp_path / "full")
    from metamorph_train import distributed

    with pytest.raises(ValueError, match="fsdp cannot shard 4-bit"):
        distributed.wrap(quantised, "fsdp", quantised.blocks(), "cpu")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'metamorph-core\[qlora\]'"):
        create("backbone", "llama", pretrained=str(backbone), quantize="nf4")


def test_qlora_trains_under_ddp_on_two_processes(run):
    """Every rank loads the 4-bit base itself; DDP averages the LoRA gradients."""
    from metamorph_core.testing import run_torchrun

    root, _, _ = run
    out = root / "ddp"
    res = run_torchrun(
        *("-m", "metamorph_core.cli", "train", root / "recipe.yaml", "train.strategy=ddp"),
        *("train.steps=2", "train.batch_size=2", f"train.output_dir={out}"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "final" / "backbone" / "adapter_model.safetensors").is_file()
    model = MetaMorphModel.from_pretrained(out / "final")
    assert model.backbone.quantize == "nf4"
