"""Preprocessed pixels that are not one fixed-size tensor: split, stacked field by field, moved;
an encoder giving them passes the conformance suite."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from metamorph_core.components.tiny_encoder import TinyPatchEncoder
from metamorph_core.pixels import move_pixels, split_pixels, stack_pixels
from metamorph_core.testing import check_encoder
from metamorph_core.vision import to_tensor_list


class FieldsEncoder(TinyPatchEncoder):
    """``tiny-patch`` whose preprocess gives a dict: the pixels and an integer gain per image
    (its height over its width, rounded, plus one)."""

    def preprocess(self, images: Any) -> dict[str, torch.Tensor]:
        sides = [round(x.shape[-2] / x.shape[-1]) + 1 for x in to_tensor_list(images)]
        return {"pixels": super().preprocess(images), "gain": torch.tensor(sides)}

    def forward(self, pixel_values: dict[str, torch.Tensor]) -> torch.Tensor:
        if not isinstance(pixel_values, dict):
            raise ValueError("FieldsEncoder reads the dict its preprocess gives")
        gain = pixel_values["gain"].to(pixel_values["pixels"].dtype).view(-1, 1, 1, 1)
        return super().forward(pixel_values["pixels"] / gain)


def test_a_batch_splits_into_images_and_stacks_back_field_by_field():
    batch = {"pixel_values": torch.rand(3, 5, 12), "spatial_shapes": torch.tensor([[1, 5]] * 3)}
    rows = split_pixels(batch)
    assert len(rows) == 3 and rows[1]["spatial_shapes"].tolist() == [1, 5]
    again = stack_pixels(rows)
    assert all(torch.equal(again[k], batch[k]) for k in batch)
    tensor = torch.rand(2, 3, 4, 4)
    assert torch.equal(stack_pixels(split_pixels(tensor)), tensor)
    moved = move_pixels(batch, "cpu", torch.bfloat16)  # dtype for floating-point fields only
    assert moved["pixel_values"].dtype == torch.bfloat16
    assert moved["spatial_shapes"].dtype == torch.int64


def test_stacking_names_what_differs():
    with pytest.raises(ValueError, match=r"different shapes \[\(3, 2, 2\), \(3, 4, 4\)\]"):
        stack_pixels([torch.rand(3, 4, 4), torch.rand(3, 2, 2)])
    with pytest.raises(ValueError, match="image 1 has fields \\['a'\\] but image 0 has"):
        stack_pixels([{"a": torch.rand(2), "b": torch.rand(1)}, {"a": torch.rand(2)}])
    with pytest.raises(ValueError, match="field 'a' has different shapes"):
        stack_pixels([{"a": torch.rand(2)}, {"a": torch.rand(3)}])
    with pytest.raises(ValueError, match="different kinds \\(Tensor, dict\\)"):
        stack_pixels([torch.rand(3, 2, 2), {"a": torch.rand(2)}])
    with pytest.raises(ValueError, match="same number of images along dim 0"):
        split_pixels({"a": torch.rand(2, 1), "b": torch.rand(3, 1)})


def test_the_conformance_suite_takes_an_encoder_that_gives_fields():
    check_encoder(FieldsEncoder(image_size=16, hidden_size=24, num_tokens=4))

    class BatchDependent(FieldsEncoder):  # the gain is the image's place in its batch
        def preprocess(self, images: Any) -> dict[str, torch.Tensor]:
            out = super().preprocess(images)
            return {**out, "gain": torch.arange(1, len(out["gain"]) + 1)}

    with pytest.raises(AssertionError, match="image 1 preprocessed alone differs from its row"):
        check_encoder(BatchDependent(image_size=16, hidden_size=24, num_tokens=4))
