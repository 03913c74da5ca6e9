"""The example objective plugin (examples/metamorph-captioning), installed by `make test` like a
user would install it: a recipe names it and `metamorph train` trains with it, with no edit to
our packages."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from metamorph_core import MetaMorphModel
from metamorph_core.cli import main

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220)}


def test_listed_by_the_cli_as_an_objective_with_its_distribution():
    res = subprocess.run(
        [sys.executable, "-m", "metamorph_core.cli", "plugins", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [r for r in json.loads(res.stdout) if r["name"] == "caption"]
    assert rows == [
        {
            "kind": "objective",
            "name": "caption",
            "distribution": "metamorph-captioning",
            "aliases": [],
            "description": rows[0]["description"],
        }
    ]


@pytest.fixture
def recipe(tmp_path, backbone_dirs):
    (tmp_path / "images").mkdir()
    pairs = []
    for name, rgb in COLOURS.items():
        Image.fromarray(np.tile(np.array(rgb, np.uint8), (16, 16, 1))).save(
            tmp_path / "images" / f"{name}.png"
        )
        pairs.append({"image": f"{name}.png", "caption": f"a {name} square"})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    tree = {
        "objective": {"name": "caption", "prompt": "What is shown?"},
        "model": {
            "encoder": {
                "name": "tiny-patch",
                "kwargs": {"image_size": 16, "hidden_size": 24, "num_tokens": 4},
            },
            "backbone": {"name": "qwen2", "kwargs": {"pretrained": str(backbone_dirs["qwen2"])}},
            "template": "chatml",
        },
        "data": {
            "sources": [
                {"path": str(tmp_path / "pairs.jsonl"), "image_root": str(tmp_path / "images")}
            ]
        },
        "train": {
            "output_dir": str(tmp_path / "run"),
            "steps": 30,
            "batch_size": 3,
            "lr": 1e-2,
            "log_every": 1,
            "progress": False,
        },
    }
    (tmp_path / "caption.yaml").write_text(yaml.safe_dump(tree))
    return tmp_path


def test_metamorph_train_runs_a_third_party_objective(recipe, capsys):
    assert main(["train", str(recipe / "caption.yaml")]) == 0
    out = capsys.readouterr().out
    assert "training: projector (4 tensors" in out  # the objective's choice, logged at start
    rows = [json.loads(x) for x in (recipe / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and set(rows[0]) >= {"text_loss", "text_tokens", "tokens_per_s"}
    # only the projector moved: every other weight is the seeded initialisation's
    trained = MetaMorphModel.from_pretrained(recipe / "run" / "final")
    tree = yaml.safe_load((recipe / "caption.yaml").read_text())
    torch.manual_seed(0)  # train.seed, as the runner seeds the model's new weights
    fresh = MetaMorphModel.from_config(tree["model"])
    a, b = trained.state_dict(), fresh.state_dict()
    moved = {k.split(".", 1)[0] for k in a if not torch.equal(a[k], b[k])}
    assert moved == {"projector"}
    # with the LLM training too, the captions are learnt (measured: 5.88 -> 1.86)
    overrides = ["objective.train_projector_only=false", "train.lr=3e-3", "train.steps=60"]
    out_dir = f"train.output_dir={recipe / 'full'}"
    assert main(["train", str(recipe / "caption.yaml"), *overrides, out_dir]) == 0
    rows = [json.loads(x) for x in (recipe / "full" / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0]["text_loss"], sum(r["text_loss"] for r in rows[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    # its options are typed and checked like ours
    capsys.readouterr()
    assert main(["train", str(recipe / "caption.yaml"), "objective.promt=x"]) == 2
    assert "unknown recipe key(s) ['objective.promt']" in capsys.readouterr().err
