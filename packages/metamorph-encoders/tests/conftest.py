"""Shared steps of the encoder tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from metamorph_core import MetaMorphModel
from metamorph_core.testing import samples, save_tiny_backbone, tiny_model_config


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a test module (``pytestmark = pytest.mark.usefixtures(...)``):
    on a shared 2-core machine often several times faster for tiny CNNs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def vpit_step(tmp_path) -> Callable[[str, dict[str, Any]], None]:
    """``vpit_step(name, kwargs)``: a unified model with encoder ``name`` (``kwargs`` giving 4
    tokens) and a tiny llama takes a VPiT step on an understanding and a generation sample:
    finite losses, projector gradients, none in the frozen encoder, and the same loss after a
    save and load."""

    def run(name: str, kwargs: dict[str, Any]) -> None:
        bb = save_tiny_backbone(tmp_path / "bb", "llama")
        cfg = tiny_model_config(bb, encoder={"name": name, "kwargs": kwargs})
        torch.manual_seed(0)
        model = MetaMorphModel.from_config(cfg)
        batch = model.prepare_batch([samples.understanding(size=40), samples.generation(size=40)])
        model.train()
        out = model(**batch)
        assert out.visual_tokens == 4 and torch.isfinite(out.loss) and out.visual_loss > 0
        out.loss.backward()
        grads = [p.grad for p in model.projector.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
        assert not any(p.grad is not None for p in model.encoder.parameters())
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
        loaded = MetaMorphModel.from_pretrained(model.save_pretrained(tmp_path / "ckpt"))
        with torch.no_grad():
            assert torch.equal(model.eval()(**batch).loss, loaded.eval()(**batch).loss)

    return run
