"""save_pretrained / from_pretrained: exact round trips and clear errors for bad directories."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from metamorph_core import MetaMorphModel
from metamorph_core.errors import CheckpointError
from metamorph_core.testing.samples import generation, text_only, understanding


def _trained_a_little(model):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batch = model.prepare_batch([understanding(), generation()])
    for _ in range(2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_round_trip_is_exact(make_model, tmp_path, family):
    model = _trained_a_little(make_model(family))
    path = model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in path.iterdir()) == [
        "README.md",
        "backbone",
        "config.json",
        "model.safetensors",
    ]
    config = json.loads((path / "config.json").read_text())
    assert config["components"]["backbone"]["subfolder"] == "backbone"
    assert config["image_start_id"] == model.backbone.image_start_id
    loaded = MetaMorphModel.from_pretrained(path).eval()
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "weights differ after reload"
    batch = model.prepare_batch([understanding(), generation(), text_only()])
    with torch.no_grad():
        assert torch.equal(model(**batch).loss, loaded(**batch).loss)
    # the backbone's rows were not re-initialised or resized on reload
    assert loaded.backbone.lm.get_input_embeddings().weight.shape == (
        model.backbone.lm.get_input_embeddings().weight.shape
    )


def test_dtype_override_on_load(make_model, tmp_path):
    path = make_model().save_pretrained(tmp_path / "ckpt")
    loaded = MetaMorphModel.from_pretrained(path, dtype="bfloat16")
    assert loaded.backbone.dtype == torch.bfloat16


def test_missing_and_extra_weights_are_named(make_model, tmp_path):
    path = make_model().save_pretrained(tmp_path / "ckpt")
    weights = load_file(str(path / "model.safetensors"))
    dropped = next(k for k in weights if k.startswith("head."))
    save_file({k: v for k, v in weights.items() if k != dropped}, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"Missing weights \(1\): \['{dropped}'\]"):
        MetaMorphModel.from_pretrained(path)
    save_file({**weights, "head.bonus": torch.zeros(1)}, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected weights \(1\): \['head.bonus'\]"):
        MetaMorphModel.from_pretrained(path)


def test_missing_backbone_weights_or_subfolder(make_model, tmp_path):
    path = make_model().save_pretrained(tmp_path / "ckpt")
    import shutil

    bb_file = path / "backbone" / "model.safetensors"
    bb_weights = load_file(str(bb_file))
    dropped = sorted(bb_weights)[-1]
    save_file({k: v for k, v in bb_weights.items() if k != dropped}, str(bb_file), {"format": "pt"})
    with pytest.raises(
        CheckpointError, match=rf"do not match its config: missing_keys: \['{dropped}'\]"
    ):
        MetaMorphModel.from_pretrained(path)
    bb_file.unlink()
    with pytest.raises(CheckpointError, match="backbone/model.safetensors is missing"):
        MetaMorphModel.from_pretrained(path)
    # a checkpoint without the list of its files (written before the list was) still names them
    meta = json.loads((path / "config.json").read_text())
    del meta["files"]
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(
        CheckpointError, match="backbone: cannot load .*no file named model.safetensors"
    ):
        MetaMorphModel.from_pretrained(path)
    shutil.rmtree(path / "backbone")
    with pytest.raises(CheckpointError, match="the backbone subfolder 'backbone/' is missing"):
        MetaMorphModel.from_pretrained(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a MetaMorph checkpoint: no config.json"):
        MetaMorphModel.from_pretrained(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="there is no local directory .*nothing-here"):
        MetaMorphModel.from_pretrained(tmp_path / "nothing-here")


def test_failed_save_leaves_previous_checkpoint_intact(make_model, tmp_path, monkeypatch):
    model = make_model()
    path = model.save_pretrained(tmp_path / "ckpt")
    before = (path / "model.safetensors").read_bytes()

    import metamorph_core.saving as model_module

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model_module, "save_tensors", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(path)
    assert (path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left behind
    MetaMorphModel.from_pretrained(path)


def test_kwargs_must_be_json(make_model, tmp_path):
    model = make_model()
    model.config.projector.kwargs["weird"] = object()
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
        model.save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize(
    ("variant", "backbone_dtype"),
    [
        ("bf16-backbone", torch.bfloat16),
        ("all-bf16", torch.bfloat16),
        ("fp32-masters", torch.float32),
    ],
)
def test_bfloat16_models_run_and_round_trip_exactly(
    tmp_path, backbone_dirs, variant, backbone_dtype
):
    from metamorph_core.testing import tiny_model_config

    cfg = tiny_model_config(backbone_dirs["qwen2"])
    cfg.backbone.kwargs["dtype"] = "bfloat16"  # projector and head stay fp32: a mixed model
    model = MetaMorphModel.from_config(cfg)
    if variant == "all-bf16":
        model = model.to(torch.bfloat16)
    elif variant == "fp32-masters":
        model = model.float()
    batch = model.prepare_batch([understanding(), generation(), text_only()])
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.visual_loss.item() > 0
    out.loss.backward()
    loaded = MetaMorphModel.from_pretrained(model.save_pretrained(tmp_path / variant))
    a, b = model.state_dict(), loaded.state_dict()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert loaded.backbone.dtype == backbone_dtype
    if variant != "all-bf16":  # .to(bf16) also rounds rotary buffers, which are not weights
        with torch.no_grad():
            assert torch.equal(model.eval()(**batch).loss, loaded.eval()(**batch).loss)


def test_dtype_override_runs_forward(make_model, tmp_path):
    path = make_model().save_pretrained(tmp_path / "ckpt")
    loaded = MetaMorphModel.from_pretrained(path, dtype="bfloat16")
    out = loaded(**loaded.prepare_batch([understanding(), generation()]))
    assert torch.isfinite(out.loss)


def test_save_refuses_to_replace_a_folder_that_is_not_a_checkpoint(make_model, tmp_path):
    model = make_model()
    (tmp_path / "outdir").mkdir()
    (tmp_path / "outdir" / "train_log.txt").write_text("precious")
    with pytest.raises(
        CheckpointError, match="refusing to save into .*outdir.*not a metamorph checkpoint"
    ):
        model.save_pretrained(tmp_path / "outdir")
    assert (tmp_path / "outdir" / "train_log.txt").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    model.save_pretrained(tmp_path / "empty")
    model.save_pretrained(tmp_path / "empty")  # replacing a checkpoint is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "outdir"]


def test_path_and_dtype_objects_in_kwargs_are_saved(backbone_dirs, tmp_path):
    from metamorph_core import create

    backbone = create("backbone", "llama", pretrained=backbone_dirs["llama"], dtype=torch.float32)
    encoder = create("encoder", "tiny-patch", image_size=16, hidden_size=24, num_tokens=4)
    model = MetaMorphModel(
        encoder,
        create("projector", "linear", in_dim=24, out_dim=32),
        backbone,
        create("head", "mlp", in_dim=32, out_dim=24),
    )
    path = model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((path / "config.json").read_text())["components"]["backbone"]["kwargs"]
    assert saved == {"pretrained": str(backbone_dirs["llama"]), "dtype": "float32"}
    MetaMorphModel.from_pretrained(path)
