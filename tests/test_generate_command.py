"""`metamorph generate` and decoding to pixels during generation: a tiny trained unified model
with a tiny `sd-unet` decoder attached (metamorph-core's generation + metamorph-decoders)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from metamorph_core import MetaMorphModel
from metamorph_core.cli import main
from metamorph_core.testing import tiny_model_config
from metamorph_core.testing.trained import ANSWER, RED, train
from metamorph_decoders.testing import tiny_decoder


@pytest.fixture(scope="module")
def model(backbone_dirs) -> MetaMorphModel:
    torch.manual_seed(0)
    return train(MetaMorphModel.from_config(tiny_model_config(backbone_dirs["llama"])))


def test_cli_writes_text_and_png(model, tmp_path, capsys):
    model.attach_decoder(tiny_decoder(model).eval())
    try:
        ckpt = model.save_pretrained(tmp_path / "model")
        (r,) = model.generate(RED, decode_images=True, decoding={"steps": 2, "seed": 0})
    finally:
        model.decoder = None
        model.config.decoder = None
    assert len(r.pil_images) == 1 and r.pil_images[0].size == (16, 16)

    out = tmp_path / "out"
    argv = ["generate", "--model", str(ckpt), RED, "--out", str(out)]
    assert main([*argv, "--decoder-steps", "2", "--decoder-seed", "0"]) == 0
    assert capsys.readouterr().out.strip() == ANSWER + "<image>"  # streamed to stdout
    assert (out / "text.txt").read_text().strip() == ANSWER + "<image>"
    record = json.loads((out / "result.json").read_text())
    assert record["images"] == ["image-0.png"] and record["finish_reason"] == "stop"
    with Image.open(out / "image-0.png") as png:
        assert png.size == (16, 16) and png.mode == "RGB"
    assert (out / "visual_tokens.safetensors").is_file()

    forced = tmp_path / "forced"
    assert (
        main(
            [
                "generate",
                "--model",
                str(ckpt),
                "a green star",
                "--out",
                str(forced),
                "--force-image",
                "--decoder-steps",
                "2",
            ]
        )
        == 0
    )
    assert (forced / "image-0.png").is_file()

    assert main([*argv, "--image", str(tmp_path / "missing.png")]) == 2
    assert "--image" in capsys.readouterr().err
    assert main([*argv, "--do-sample", "--top-p", "0"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err
