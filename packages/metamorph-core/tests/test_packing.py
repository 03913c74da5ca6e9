"""Sequence packing: attention stays inside each sample, so every packed sample's loss equals
its loss alone."""

from __future__ import annotations

import pytest
import torch

from metamorph_core.conversation import Conversation, Turn
from metamorph_core.sequence import IGNORE_INDEX
from metamorph_core.testing.samples import generation, text_only, understanding
from metamorph_core.testing.samples import random_image as image


def _conversations():
    edit = Conversation(
        [Turn("user", "<image>\nmake it blue"), Turn("assistant", "<image>")],
        [image(3), image(4)],
        id="edit",
    )
    return [understanding(0), generation(1), text_only(), edit, generation(2), understanding(5)]


def _only(batch: dict, i: int) -> dict:
    """The packed batch with every label and visual target outside sample ``i`` removed."""
    keep = batch["sample_index"] == i
    out = dict(batch)
    out["labels"] = torch.where(
        keep, batch["labels"], torch.full_like(batch["labels"], IGNORE_INDEX)
    )
    out["target_slot_mask"] = batch["target_slot_mask"] & keep
    return out


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_every_packed_sample_has_its_unpacked_loss(make_model, family):
    model = make_model(family).eval()
    convs = _conversations()
    longest = max(len(model.sequence_builder.encode(c)) for c in convs)
    packed = model.prepare_batch(convs, pack_to=2 * longest)
    assert "attention_mask" not in packed
    rows = packed["input_ids"].shape[0]
    assert rows < len(convs)  # samples really share rows
    assert (packed["sample_index"] >= 0).sum() == sum(
        len(model.sequence_builder.encode(c)) for c in convs
    )
    with torch.no_grad():
        for i, conv in enumerate(convs):
            alone = model(**model.prepare_batch([conv]))
            inside = model(**_only(packed, i))
            assert inside.text_tokens == alone.text_tokens, conv.id
            assert inside.visual_tokens == alone.visual_tokens, conv.id
            assert inside.text_loss_sum.item() == pytest.approx(
                alone.text_loss_sum.item(), rel=1e-4, abs=1e-5
            ), conv.id
            assert inside.visual_loss_sum.item() == pytest.approx(
                alone.visual_loss_sum.item(), rel=1e-4, abs=1e-5
            ), conv.id
        padded = model(**model.prepare_batch(convs))
        whole = model(**packed)
    assert whole.loss.item() == pytest.approx(padded.loss.item(), rel=1e-4)


def test_packing_rejects_samples_longer_than_a_row(make_model):
    model = make_model()
    with pytest.raises(
        ValueError, match="sample 'gen-1' has \\d+ tokens, more than the packing length 10"
    ):
        model.prepare_batch([generation(1)], pack_to=10)
