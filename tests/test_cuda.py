"""CUDA checks: skipped on machines without a GPU (CI), run on one (see NOTES.md)."""

from __future__ import annotations

import pytest
import torch

from metamorph_core import MetaMorphModel, create
from metamorph_core.testing import tiny_model_config
from metamorph_core.testing.samples import generation, text_only, understanding
from metamorph_decoders.testing import tiny_unet_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

UNET = tiny_unet_config(  # cross-attention at the lower level
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_unified_model_with_decoder_on_cuda(backbone_dirs, tmp_path, dtype):
    cfg = tiny_model_config(backbone_dirs["qwen2"])
    cfg.backbone.kwargs["dtype"] = dtype
    model = MetaMorphModel.from_config(cfg)
    model.attach_decoder(
        create(
            "decoder",
            "sd-unet",
            token_dim=24,
            num_tokens=4,
            unet_config=UNET,
            adapter={"name": "mlp", "kwargs": {"hidden_dims": [48]}},
            dtype=dtype,
            seed=0,
        )
    )
    model.to("cuda")
    batch = model.prepare_batch([understanding(), generation(), text_only()])
    assert batch["input_ids"].is_cuda
    out = model(**batch, return_logits=False)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    tokens = model.encode_images(batch["pixel_values"])
    loss = model.decoder.loss(
        tokens, torch.rand(2, 3, 16, 16, device="cuda"), generator=torch.Generator().manual_seed(0)
    )
    assert torch.isfinite(loss)
    a = model.decode_images(tokens, steps=3, seed=0)
    assert a.is_cuda and torch.equal(a, model.decode_images(tokens, steps=3, seed=0))
    loaded = MetaMorphModel.from_pretrained(model.save_pretrained(tmp_path / "ckpt")).to("cuda")
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).loss, loaded.eval()(**batch).loss)
