"""The objectives beyond VPiT: `causal-lm` (with a tokenizer trained on the data), `siglip`,
`decoder` (live tokens and feature cache), and streaming sharded sources."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from metamorph_core import MetaMorphModel, create
from metamorph_core.cli import main as cli
from metamorph_core.config import ComponentSpec, MetaMorphConfig
from metamorph_train.data import ConversationDataset, Mixture
from metamorph_train.recipe import load_recipe
from metamorph_train.runner import run_recipe

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 60),
    "blue": (30, 60, 220),
    "yellow": (230, 220, 40),
}
FACTS = [
    "grass is green.",
    "the sky is blue.",
    "a banana is yellow.",
    "a tomato is red.",
    "two plus two is four.",
    "three plus one is four.",
]


def _image(rgb, half: bool) -> np.ndarray:
    arr = np.full((16, 16, 3), 128, np.uint8)
    arr[:, :8] = rgb if half else arr[:, :8]
    arr[:, 8:] = arr[:, 8:] if half else rgb
    return arr


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    (root / "images").mkdir()
    pairs = []
    for name, rgb in COLOURS.items():
        for side in ("left", "right"):
            Image.fromarray(_image(rgb, side == "left")).save(
                root / "images" / f"{name}-{side}.png"
            )
            pairs.append({"image": f"{name}-{side}.png", "caption": f"{name} on the {side}"})
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    text = [{"text": t} for t in FACTS]
    (root / "text.jsonl").write_text("\n".join(json.dumps(t) for t in text) + "\n")
    return root


def _write(path, tree):
    path.write_text(yaml.safe_dump(tree))
    return path


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_lm_pretrain_trains_a_tokenizer_and_a_loadable_backbone(world, tmp_path):
    recipe = _write(
        tmp_path / "lm.yaml",
        {
            "objective": "causal-lm",
            "model": {
                "architecture": "llama",
                "config": {
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "num_key_value_heads": 2,
                },
                "vocab_size": 300,
                "max_length": 64,
            },
            "data": {"sources": [{"path": str(world / "text.jsonl")}]},
            "train": {
                "output_dir": str(tmp_path / "lm"),
                "steps": 40,
                "batch_size": 6,
                "lr": 1e-2,
                "log_every": 1,
            },
        },
    )
    assert cli(["train", str(recipe)]) == 0
    rows = _rows(tmp_path / "lm")
    assert rows[-1]["text_loss"] < 0.5 * rows[0]["text_loss"], (rows[0], rows[-1])
    final = tmp_path / "lm" / "final"
    assert (final / "tokenizer.json").is_file() and (tmp_path / "lm" / "tokenizer").is_dir()
    # the pretrained LM is a backbone like any hub checkpoint, with the chatml template
    model = MetaMorphModel.from_config(
        MetaMorphConfig(
            encoder=ComponentSpec("tiny-patch", {"image_size": 16, "num_tokens": 4}),
            backbone=ComponentSpec("llama", {"pretrained": str(final)}),
            template=ComponentSpec("chatml"),
        )
    )
    tok = model.backbone.tokenizer
    assert tok.convert_ids_to_tokens(tok("grass is green.")["input_ids"]) != list("grass is green.")


def test_encoder_pretrain_saves_a_siglip_encoder(world, tmp_path):
    recipe = _write(
        tmp_path / "enc.yaml",
        {
            "objective": "siglip",
            "model": {
                "config": {"image_size": 16, "patch_size": 4, "hidden_size": 32, "num_layers": 1},
                "vocab_size": 290,
            },
            "data": {
                "sources": [
                    {"path": str(world / "pairs.jsonl"), "image_root": str(world / "images")}
                ]
            },
            "train": {
                "output_dir": str(tmp_path / "enc"),
                "steps": 40,
                "batch_size": 8,
                "lr": 3e-3,
                "log_every": 1,
            },
        },
    )
    summary = run_recipe(load_recipe(recipe), log=None)
    rows = _rows(tmp_path / "enc")
    assert rows[-1]["sigmoid_loss"] < 0.7 * rows[0]["sigmoid_loss"], (rows[0], rows[-1])
    encoder = create("encoder", "siglip", pretrained=summary["saved"], num_tokens=4)
    image = torch.from_numpy(_image(COLOURS["red"], True)).permute(2, 0, 1) / 255
    tokens = encoder(encoder.preprocess([image]))
    assert tokens.shape == (1, 4, 32)


def _decoder_recipe(world, tmp_path, name, **data):
    return _write(
        tmp_path / f"{name}.yaml",
        {
            "objective": "decoder",
            "model": {
                "encoder": {
                    "name": "tiny-patch",
                    "kwargs": {"image_size": 16, "hidden_size": 24, "num_tokens": 4},
                },
                "decoder": {
                    "name": "sd-unet",
                    "kwargs": {
                        "unet_config": {
                            "sample_size": 16,
                            "in_channels": 3,
                            "out_channels": 3,
                            "layers_per_block": 1,
                            "block_out_channels": [16, 32],
                            "cross_attention_dim": 32,
                            "attention_head_dim": 8,
                            "norm_num_groups": 8,
                            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
                        },
                        "adapter": {"name": "mlp", "kwargs": {"hidden_dims": [32]}},
                        "context_length": 4,
                        "prediction_type": "sample",
                        "cond_dropout": 0.1,
                        "seed": 0,
                    },
                },
            },
            "data": {
                "sources": [
                    {"path": str(world / "pairs.jsonl"), "image_root": str(world / "images")}
                ],
                **data,
            },
            "train": {
                "output_dir": str(tmp_path / name),
                "steps": 3,
                "batch_size": 4,
                "lr": 1e-3,
                "log_every": 1,
            },
        },
    )


def test_decoder_recipe_from_live_tokens_equals_from_the_cache(world, tmp_path):
    live = run_recipe(load_recipe(_decoder_recipe(world, tmp_path, "live")), log=None)
    assert (
        cli(
            [
                "cache-features",
                "--data",
                str(world / "pairs.jsonl"),
                "--image-root",
                str(world / "images"),
                "--encoder",
                "tiny-patch",
                "--encoder-kwargs",
                json.dumps({"image_size": 16, "hidden_size": 24, "num_tokens": 4}),
                "--out",
                str(tmp_path / "cache"),
            ]
        )
        == 0
    )
    recipe = _decoder_recipe(world, tmp_path, "cached", feature_cache=str(tmp_path / "cache"))
    run_recipe(load_recipe(recipe), log=None)
    a, b = _rows(tmp_path / "live"), _rows(tmp_path / "cached")
    assert [r["diffusion_images"] for r in a] == [4, 4, 4]
    for x, y in zip(a, b, strict=True):
        assert abs(x["diffusion_loss"] - y["diffusion_loss"]) < 1e-5, (x, y)
    decoder = create("decoder", "sd-unet", pretrained=live["saved"])
    tokens = torch.randn(2, 4, 24)
    images = decoder.decode(tokens, steps=2, seed=0)
    assert images.shape == (2, 3, 16, 16)


def test_other_objectives_reject_vpit_keys(world, tmp_path):
    recipe = _decoder_recipe(world, tmp_path, "bad")
    with pytest.raises(ValueError, match=r"unknown recipe key\(s\) \['objective.init_from'\]"):
        load_recipe(recipe, ["objective.init_from=somewhere"])
    with pytest.raises(ValueError, match=r"unknown recipe key\(s\) \['model.decoders'\]"):
        load_recipe(recipe, ["model.decoders=1"])


def _shards(root, n_records=10, n_shards=3):
    root.mkdir()
    for s in range(n_shards):
        lines = []
        for k in range(s, n_records, n_shards):
            lines.append(
                json.dumps(
                    {
                        "id": f"r{k}",
                        "conversations": [
                            {"from": "human", "value": f"question {k}"},
                            {"from": "gpt", "value": f"answer {k}"},
                        ],
                    }
                )
            )
        (root / f"part-{s:03d}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_streaming_sources_resume_exactly(tmp_path):
    shards = _shards(tmp_path / "shards")

    def mixture():
        return Mixture(
            {
                "stream": ConversationDataset(shards, tmp_path, streaming=True, seed=3),
                "glob": ConversationDataset(
                    str(shards / "part-00[01].jsonl"), tmp_path, streaming=True, seed=4
                ),
            },
            {"stream": 1.0, "glob": 1.0},
            seed=0,
        )

    whole = mixture()
    ids = [whole.next()[1].id for _ in range(40)]  # several epochs of both sources
    assert sorted(set(ids)) == sorted(f"r{k}" for k in range(10))
    first = mixture()
    head = [first.next()[1].id for _ in range(17)]
    state = json.loads(json.dumps(first.state_dict()))  # JSON round trip, as checkpoints do
    second = mixture()
    second.load_state_dict(state)
    tail = [second.next()[1].id for _ in range(23)]
    assert head + tail == ids


def test_streaming_errors_name_shard_and_line_or_skip(tmp_path):
    shards = _shards(tmp_path / "shards")
    with open(shards / "part-001.jsonl", "a") as f:
        f.write("{not json\n")
    data = ConversationDataset(shards, tmp_path, streaming=True)
    with pytest.raises(ValueError, match=r"part-001\.jsonl:4: malformed JSON"):
        for _ in range(20):
            data.next()
    data = ConversationDataset(shards, tmp_path, on_error="skip", streaming=True)
    items = [data.next() for _ in range(11)]  # one epoch: 10 records and the bad line
    assert sum(x is None for x in items) == 1 and data.errors.summary() == {"bad_records": 1}
    with pytest.raises(FileNotFoundError, match="names no .jsonl shards"):
        ConversationDataset(tmp_path / "nothing-*.jsonl", tmp_path, streaming=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no usable records"):
        ConversationDataset(tmp_path / "empty", tmp_path, streaming=True).next()


def test_decoder_fine_tunes_on_tokens_an_llm_predicted(world, tmp_path, capsys):
    from metamorph_core.testing import save_tiny_backbone, tiny_model_config
    from metamorph_train.cache import FeatureCache

    enc = {"image_size": 16, "hidden_size": 24, "num_tokens": 4}  # the decoder recipe's encoder
    torch.manual_seed(0)
    config = tiny_model_config(
        save_tiny_backbone(tmp_path / "bb"), encoder=ComponentSpec("tiny-patch", enc)
    )
    MetaMorphModel.from_config(config).save_pretrained(tmp_path / "model")
    pairs = [json.loads(x) for x in (world / "pairs.jsonl").read_text().splitlines()]
    gen = [
        {
            "id": f"g{k}",
            "image": p["image"],
            "conversations": [
                {"from": "human", "value": f"draw {p['caption']}"},
                {"from": "gpt", "value": "here: <image>"},
            ],
        }
        for k, p in enumerate(pairs)
    ]
    understanding = {  # not a generation target: left out of the predicted cache
        "id": "u",
        "image": pairs[0]["image"],
        "conversations": [
            {"from": "human", "value": "<image>\nwhat colour?"},
            {"from": "gpt", "value": "red"},
        ],
    }
    (tmp_path / "gen.jsonl").write_text("\n".join(json.dumps(r) for r in gen + [understanding]))
    args = ["cache-features", "--data", str(tmp_path / "gen.jsonl"), "--image-root"]
    args += [str(world / "images"), "--out", str(tmp_path / "pred")]
    assert cli(args) == 2
    assert "exactly one of --encoder, --predicted-by" in capsys.readouterr().err
    (tmp_path / "u.jsonl").write_text(json.dumps(understanding))
    none = ["cache-features", "--data", str(tmp_path / "u.jsonl"), "--image-root"]
    none += [str(world / "images"), "--out", str(tmp_path / "none")]
    assert cli(none + ["--predicted-by", str(tmp_path / "model")]) == 2
    assert "no text-to-image records" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    assert cli(args + ["--predicted-by", str(tmp_path / "model")]) == 0

    model = MetaMorphModel.from_pretrained(tmp_path / "model").eval()
    with pytest.raises(ValueError, match="holds tokens predicted by the model"):
        FeatureCache(tmp_path / "pred", model.encoder)  # VPiT must never read these
    encoder = create("encoder", "tiny-patch", **enc)  # as the model's config names it
    cache = FeatureCache(tmp_path / "pred", encoder, allow_predicted=True)
    assert len(cache) == len(pairs) and cache.predicted_by == str(tmp_path / "model")
    with torch.no_grad():  # the cached tokens are what the model generates for the prompt
        want = model.generate_image([f"draw {pairs[2]['caption']}"], response_prefix="here: ")
    got = cache.get(pairs[2]["image"]).tokens
    assert torch.allclose(got, want[0].images[0], atol=1e-5)
    assert not torch.allclose(
        got,
        model.encoder(
            model.encoder.preprocess(
                [
                    torch.from_numpy(
                        np.array(Image.open(world / "images" / pairs[2]["image"]))
                    ).permute(2, 0, 1)
                    / 255
                ]
            )
        )[0],
        atol=1e-2,
    )

    # the decoder recipe, from a trained decoder, learns on them; VPiT recipes refuse them
    base = run_recipe(load_recipe(_decoder_recipe(world, tmp_path, "base")), log=None)
    tuned = _write(
        tmp_path / "tune.yaml",
        {
            "objective": "decoder",
            "model": {
                "encoder": {"name": "tiny-patch", "kwargs": enc},
                "decoder": {"name": "sd-unet", "kwargs": {"pretrained": base["saved"]}},
            },
            "data": {
                "sources": [
                    {"path": str(tmp_path / "gen.jsonl"), "image_root": str(world / "images")}
                ],
                "feature_cache": str(tmp_path / "pred"),
            },
            "train": {
                "output_dir": str(tmp_path / "tuned"),
                "steps": 2,
                "batch_size": 4,
                "log_every": 1,
            },
        },
    )
    out = run_recipe(load_recipe(tuned), log=None)
    assert [r["diffusion_images"] for r in _rows(tmp_path / "tuned")] == [4, 4]
    assert create("decoder", "sd-unet", pretrained=out["saved"]).decode(
        got[None], steps=2, seed=0
    ).shape == (1, 3, 16, 16)


RETRIEVAL_COLOURS = {
    "red": (230, 25, 25),
    "green": (25, 205, 50),
    "blue": (25, 50, 230),
    "yellow": (240, 230, 25),
}


def _retrieval_world(root, per_class: int, seed: int):
    """32x32 renders of a coloured square, horizontal bar or vertical column at a random place
    on a noisy grey background, captioned "a {colour} {shape}" (12 classes)."""
    rng = np.random.default_rng(seed)
    root.mkdir()
    rows, images, captions = [], [], []
    for k in range(per_class):
        for colour, rgb in RETRIEVAL_COLOURS.items():
            for shape, (h, w) in {"square": (10, 10), "bar": (5, 20), "column": (20, 5)}.items():
                img = np.clip(128 + 13 * rng.standard_normal((32, 32, 3)), 0, 255).astype(np.uint8)
                y, x = int(rng.integers(0, 32 - h)), int(rng.integers(0, 32 - w))
                img[y : y + h, x : x + w] = rgb
                name = f"{colour}-{shape}-{k}.png"
                Image.fromarray(img).save(root / name)
                rows.append({"image": name, "caption": f"a {colour} {shape}"})
                images.append(torch.from_numpy(img).permute(2, 0, 1) / 255)
                captions.append(f"a {colour} {shape}")
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return torch.stack(images), captions


def test_the_siglip_objective_learns_image_text_retrieval(tmp_path):
    """Sigmoid-loss pretraining through the trainer: retrieval among 12 captions on unseen
    renders rises far above chance and the saved directory loads as the `siglip` encoder."""
    from transformers import AutoTokenizer, SiglipModel

    from metamorph_encoders.pretrain import retrieval_accuracy

    _retrieval_world(tmp_path / "train", per_class=64, seed=0)
    test_images, test_captions = _retrieval_world(tmp_path / "test", per_class=4, seed=1)
    recipe = _write(
        tmp_path / "siglip.yaml",
        {
            "objective": "siglip",
            "model": {
                "config": {
                    "image_size": 32,
                    "patch_size": 8,
                    "hidden_size": 64,
                    "num_layers": 1,
                    "max_text_length": 8,
                },
                "vocab_size": 300,
            },
            "data": {
                "sources": [
                    {
                        "path": str(tmp_path / "train" / "pairs.jsonl"),
                        "image_root": str(tmp_path / "train"),
                    }
                ]
            },
            "train": {
                "output_dir": str(tmp_path / "run"),
                "steps": 400,
                "batch_size": 48,
                "lr": 1e-3,
                "warmup_ratio": 0.05,
                "log_every": 10,
                "progress": False,
            },
        },
    )
    saved = run_recipe(load_recipe(recipe), log=None)["saved"]
    rows = _rows(tmp_path / "run")
    assert rows[-1]["sigmoid_loss"] < 0.5 * rows[0]["sigmoid_loss"], (rows[0], rows[-1])
    model, tokenizer = SiglipModel.from_pretrained(saved), AutoTokenizer.from_pretrained(saved)
    after = retrieval_accuracy(model, tokenizer, test_images, test_captions)
    assert after["chance"] == 1 / 12
    # colour alone would give about 1/3: the shape is learnt too
    assert after["image_to_text"] > 0.5 and after["text_to_image"] > 0.5, after
    encoder = create("encoder", "siglip", pretrained=saved, num_tokens=4)
    assert encoder.hidden_size == 64 and encoder.image_size == (32, 32)
