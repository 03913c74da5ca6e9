"""``metamorph convert-research``: tiny checkpoints written in the research code's layout,
converted, give the logits and visual tokens of a hand-assembled forward of the research
modules; the visualizer converts to an equal ``sd-unet`` decoder; unsafe or unconvertible
inputs are refused with a message saying why."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_research import (
    HIDDEN,
    IMAGE,
    NUM_TOKENS,
    TOKEN_DIM,
    build_parts,
    research_features,
    research_forward,
    write_checkpoint,
    write_visualizer,
)

from metamorph_core import MetaMorphModel
from metamorph_core.cli import main
from metamorph_core.conversation import Conversation, Turn
from metamorph_core.errors import CheckpointError
from metamorph_train.research import convert_research_checkpoint
from metamorph_train.research.encoder import tower_config


@pytest.fixture(scope="module")
def parts():
    return build_parts(seed=0)


@pytest.fixture(scope="module")
def tower_dir(parts, tmp_path_factory):
    """The SigLIP tower saved on its own: the --encoder directory (config, and weights when
    the checkpoint holds none)."""
    path = tmp_path_factory.mktemp("tower")
    parts.tower.save_pretrained(str(path))
    return path


def _inputs(model: MetaMorphModel, pixel_values: torch.Tensor):
    """Identical ids for both sides, in the research layout: the research code's two BOS
    tokens, then the prompt with ``<image_start>`` + 64 slots + ``<image_end>``."""
    conv = Conversation(
        [
            Turn("user", "<image>\nwhat colour is the shape?"),
            Turn("assistant", "the shape is red."),
        ],
        images=[pixel_values[0]],
    )
    sample = model.sequence_builder.encode(conv)
    bos = model.backbone.tokenizer.bos_token_id
    ids = torch.tensor([[bos, *sample.input_ids]])
    start = sample.image_slots[0] + 1
    slots = torch.zeros_like(ids, dtype=torch.bool)
    slots[0, start : start + NUM_TOKENS] = True
    assert ids[0, 0] == ids[0, 1] == bos
    assert ids[0, start - 1] == model.backbone.image_start_id
    assert ids[0, start + NUM_TOKENS] == model.backbone.image_end_id
    return ids, slots


def _check_equivalent(parts, out: Path) -> MetaMorphModel:
    model = MetaMorphModel.from_pretrained(out).eval()
    pixel_values = torch.rand(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
    pixel_values = pixel_values * 2 - 1
    with torch.no_grad():
        ours_tokens = model.encode_images(pixel_values)
        torch.testing.assert_close(
            ours_tokens, research_features(parts, pixel_values), atol=1e-5, rtol=0
        )
        ids, slots = _inputs(model, pixel_values)
        out_ = model(input_ids=ids, image_slot_mask=slots, pixel_values=pixel_values)
        visual = model.predict_visual_tokens(out_.hidden_states)
    logits_ref, visual_ref = research_forward(parts, ids, slots, pixel_values)
    torch.testing.assert_close(out_.logits, logits_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(visual, visual_ref, atol=1e-5, rtol=0)
    return model


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin", "bin-sharded"])
def test_converted_model_matches_research_forward(parts, tower_dir, tmp_path, layout, caplog):
    ckpt = write_checkpoint(parts, tmp_path / "research", layout=layout)
    with caplog.at_level(logging.INFO, logger="metamorph"):
        out = convert_research_checkpoint(ckpt, tmp_path / "ours", encoder=str(tower_dir))
    assert "model.vision_proj.weight" in caplog.text  # unused by the research code: dropped
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # staging is gone
    assert "two BOS tokens" in caplog.text
    model = _check_equivalent(parts, out)

    tok = parts.tokenizer
    ids = tok.convert_tokens_to_ids(["<image_start>", "<image_end>"])
    assert [model.backbone.image_start_id, model.backbone.image_end_id] == ids
    assert ids == [len(tok) - 2, len(tok) - 1]
    c = model.config
    assert (c.encoder.name, c.projector.name, c.head.name, c.template.name) == (
        "siglip",
        "mlp2x_gelu",
        "mlp",
        "llama3",
    )
    enc = model.encoder
    assert (enc.layer, enc.num_tokens, enc.reduction, enc.normalize) == (
        -1,
        64,
        "interpolate",
        True,
    )
    meta = json.loads((out / "config.json").read_text())
    record = meta["converted_from"]
    assert record["checkpoint"] == str(ckpt.resolve())
    assert record["ignored_weights"] == ["model.vision_proj.bias", "model.vision_proj.weight"]
    assert record["encoder_weights"] == "the checkpoint's vision tower"
    assert record["research_config"]["vision_head_type"] == "mlp"
    backbone_cfg = json.loads((out / "backbone" / "config.json").read_text())
    assert backbone_cfg["model_type"] == "llama"
    assert backbone_cfg["rope_parameters"]["rope_theta"] == 500000.0  # legacy fields kept
    assert not any(k.startswith("mm_") for k in backbone_cfg)


def _mlp(dims: list[int]) -> torch.nn.Module:
    """A bare Linear for two widths, else Linear GELU ... Linear as an ``nn.Sequential``."""
    layers: list[torch.nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:], strict=True):
        layers += [torch.nn.Linear(a, b), torch.nn.GELU()]
    return layers[0] if len(layers) == 2 else torch.nn.Sequential(*layers[:-1])


@pytest.mark.parametrize(
    ("projector_type", "projector", "head_type", "head", "ours"),
    [
        ("linear", [TOKEN_DIM, HIDDEN], None, [HIDDEN, TOKEN_DIM], ("linear", "linear")),
        (
            "mlp3x_gelu",
            [TOKEN_DIM, HIDDEN, HIDDEN, HIDDEN],
            "mlp2x_gelu",
            [HIDDEN, HIDDEN, HIDDEN, TOKEN_DIM],
            ("mlp3x_gelu", "mlp2x_gelu"),
        ),
    ],
)
def test_other_projector_and_head_types(
    parts, tower_dir, tmp_path, projector_type, projector, head_type, head, ours
):
    """A bare Linear is ``PREFIX.weight`` in the research layout, a Sequential
    ``PREFIX.{i}.weight``; a missing head type is the research code's Linear(d, 1152)."""
    torch.manual_seed(3)
    variant = dataclasses.replace(parts, projector=_mlp(projector), vision_head=_mlp(head))
    overrides = {"mm_projector_type": projector_type, "vision_head_type": head_type}
    ckpt = write_checkpoint(variant, tmp_path / "research", **overrides)
    out = convert_research_checkpoint(ckpt, tmp_path / "ours", encoder=str(tower_dir))
    model = _check_equivalent(variant, out)
    assert (model.config.projector.name, model.config.head.name) == ours


def test_so400m_tower_config_is_read_off_the_weights():
    tower = {
        "embeddings.patch_embedding.weight": torch.empty(1152, 3, 14, 14),
        "embeddings.position_embedding.weight": torch.empty(729, 1152),
        "encoder.layers.0.mlp.fc1.weight": torch.empty(4304, 1152),
        **{f"encoder.layers.{i}.layer_norm1.weight": torch.empty(1) for i in range(27)},
    }
    cfg = tower_config(tower, None, "google/siglip-so400m-patch14-384")
    got = (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers)
    assert got == (1152, 4304, 27)
    assert (cfg.num_attention_heads, cfg.patch_size, cfg.image_size) == (16, 14, 384)
    assert not cfg.vision_use_head


def test_checkpoint_without_tower_takes_the_encoder_directory(parts, tower_dir, tmp_path):
    ckpt = write_checkpoint(parts, tmp_path / "research", tower=False)
    out = convert_research_checkpoint(ckpt, tmp_path / "ours", encoder=str(tower_dir))
    _check_equivalent(parts, out)
    record = json.loads((out / "config.json").read_text())["converted_from"]
    assert record["encoder_weights"] == str(tower_dir.resolve())


def test_without_tower_nothing_is_downloaded(parts, tmp_path):
    ckpt = write_checkpoint(parts, tmp_path / "research", tower=False)
    with pytest.raises(CheckpointError, match="nothing is downloaded"):
        convert_research_checkpoint(ckpt, tmp_path / "ours", encoder="nobody/not-a-model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["research"]  # nothing left behind


def test_tower_config_is_needed_for_a_tower_of_unknown_width(parts, tmp_path):
    ckpt = write_checkpoint(parts, tmp_path / "research")
    with pytest.raises(CheckpointError, match="attention heads and image size"):
        convert_research_checkpoint(ckpt, tmp_path / "ours", encoder="nobody/not-a-model")


class _NotATensor:
    pass


def test_pickles_are_loaded_with_weights_only(parts, tmp_path):
    ckpt = write_checkpoint(parts, tmp_path / "research", layout="bin")
    state = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "extra": _NotATensor()}, ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True.*safetensors"):
        convert_research_checkpoint(ckpt, tmp_path / "ours")
    torch.save({"model": state}, ckpt / "pytorch_model.bin")  # loads, but is no state dict
    with pytest.raises(CheckpointError, match="not a state dict"):
        convert_research_checkpoint(ckpt, tmp_path / "ours")


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"vision_head_type": "linear"}, "Linear\\(d, d\\)"),
        ({"vision_head_type": "transformer"}, "vision_head_type='transformer'"),
        ({"mm_projector_type": "identity"}, "mm_projector_type='identity'"),
        ({"normalize_vision": False}, "normalize_vision=False"),
        ({"image_token_reduction": "mlpmixer"}, "image_token_reduction='mlpmixer'"),
        ({"num_image_tokens": 60}, "square number"),
        ({"mm_use_im_start_end": False}, "mm_use_im_start_end=False"),
        ({"mm_hidden_size": 16}, "mm_hidden_size=16"),
        ({"model_type": "llama"}, "not a checkpoint of the research code"),
    ],
)
def test_unconvertible_configs_are_refused(parts, tower_dir, tmp_path, override, match):
    ckpt = write_checkpoint(parts, tmp_path / "research")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, **override}))
    with pytest.raises(CheckpointError, match=match):
        convert_research_checkpoint(ckpt, tmp_path / "ours", encoder=str(tower_dir))


def test_weights_that_do_not_fit_are_refused(parts, tower_dir, tmp_path):
    ckpt = write_checkpoint(parts, tmp_path / "research", layout="bin")
    state = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    state["vision_head.2.weight"] = torch.zeros(TOKEN_DIM + 1, HIDDEN)
    state["model.mystery.weight"] = torch.zeros(1)
    torch.save(state, ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="model.mystery.weight"):
        convert_research_checkpoint(ckpt, tmp_path / "ours", encoder=str(tower_dir))
    del state["model.mystery.weight"]
    torch.save(state, ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="vision_head.2.weight"):
        convert_research_checkpoint(ckpt, tmp_path / "ours", encoder=str(tower_dir))


def test_tokenizer_without_image_tokens_is_refused(parts, tower_dir, tmp_path):
    from metamorph_core.testing import build_tiny_tokenizer

    ckpt = write_checkpoint(parts, tmp_path / "research")
    for f in ckpt.glob("tokenizer*"):
        f.unlink()
    build_tiny_tokenizer("llama").save_pretrained(str(ckpt))
    with pytest.raises(CheckpointError, match="lacks \\['<image_start>', '<image_end>'\\]"):
        convert_research_checkpoint(ckpt, tmp_path / "ours", encoder=str(tower_dir))


def test_visualizer_converts_to_an_equal_decoder(parts, tower_dir, tmp_path):
    ckpt = write_checkpoint(parts, tmp_path / "research")
    sd15, vis, adapter, unet = write_visualizer(tmp_path)
    out = convert_research_checkpoint(
        ckpt, tmp_path / "ours", visualizer=vis, sd15=sd15, encoder=str(tower_dir)
    )
    model = MetaMorphModel.from_pretrained(out).eval()
    decoder = model.decoder
    assert decoder is not None
    c = decoder.config
    assert (c.context_length, c.null_conditioning, c.prediction_type, c.cond_dropout) == (
        77,
        "zeros",
        "epsilon",
        0.8,
    )
    assert c.adapter_spec == {"name": "mlp", "kwargs": {"hidden_dims": [40]}}
    assert decoder.mode == "latent"
    g = torch.Generator().manual_seed(0)
    tokens = F.normalize(torch.randn(2, NUM_TOKENS, TOKEN_DIM, generator=g), dim=-1)
    with torch.no_grad():
        context = decoder.context(tokens)
        reference = F.pad(adapter(tokens), (0, 0, 0, 77 - NUM_TOKENS))
        torch.testing.assert_close(context, reference, atol=1e-5, rtol=0)
        x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500])
        ours = decoder.unet(x, t, encoder_hidden_states=context).sample
        theirs = unet(x, t, encoder_hidden_states=reference).sample
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    record = json.loads((out / "config.json").read_text())["converted_from"]["visualizer"]
    assert record["model_config"]["hidden_dim"] == 40


def test_visualizer_pickles_and_sd15_are_checked(parts, tower_dir, tmp_path):
    ckpt = write_checkpoint(parts, tmp_path / "research")
    sd15, vis, _, _ = write_visualizer(tmp_path)
    with pytest.raises(ValueError, match="give both"):
        convert_research_checkpoint(ckpt, tmp_path / "ours", visualizer=vis)
    torch.save({"model_state_dict": {"x": _NotATensor()}}, vis / "unet_checkpoint.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        convert_research_checkpoint(
            ckpt, tmp_path / "ours", visualizer=vis, sd15=sd15, encoder=str(tower_dir)
        )


def test_command(parts, tower_dir, tmp_path, capsys):
    ckpt = write_checkpoint(parts, tmp_path / "research", layout="sharded")
    out = tmp_path / "ours"
    assert main(["convert-research", str(ckpt), str(out), "--encoder", str(tower_dir)]) == 0
    assert "MetaMorphModel.from_pretrained" in capsys.readouterr().out
    MetaMorphModel.from_pretrained(out)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert main(["convert-research", str(ckpt), str(tmp_path / "taken")]) == 2
    assert "refusing to write into" in capsys.readouterr().err
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
