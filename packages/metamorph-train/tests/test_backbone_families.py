"""Every transformers causal-LM family listed in docs/backbones.md, on a tiny random model of
it: forward equal to transformers', the VPiT loss, a LoRA step, KV-cached generation equal to
recompute, the save/load round trip, FSDP2 block by block on 2 processes, and a run of
`metamorph train` with the default template (`auto`). The table in docs/backbones.md is this
run's result: the last test compares them (``METAMORPH_UPDATE_DOCS=1`` rewrites the table)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from backbone_matrix import (
    FAMILIES,
    NAMED,
    Row,
    family_row,
    saved_backbone,
    table,
    write_colour_data,
)

from metamorph_core import MetaMorphModel
from metamorph_core.cli import main as cli
from metamorph_core.testing import run_torchrun

DOCS = Path(__file__).resolve().parents[3] / "docs" / "backbones.md"
BEGIN, END = "<!-- family matrix: begin -->", "<!-- family matrix: end -->"
SCRIPT = Path(__file__).with_name("backbone_matrix.py")


class Matrix:
    """The matrix's results, each computed once per session, whichever test asks first."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.rows: dict[str, Row] = {}
        self.fsdp: dict[str, dict[str, str]] | None = None

    def row(self, family: str) -> Row:
        if family not in self.rows:
            row = family_row(family, self.root)
            fsdp = self.fsdp_results()[family]
            row.cells["fsdp2"] = fsdp.get("cell", "FAILED")
            if "error" in fsdp:
                row.failures["fsdp2"] = fsdp["error"]
            row.check("train_cli", self.train_cli, family)
            self.rows[family] = row
        return self.rows[family]

    def fsdp_results(self) -> dict[str, dict[str, str]]:
        """One torchrun of 2 processes checks every family."""
        if self.fsdp is None:
            for family in FAMILIES:
                saved_backbone(self.root, family)
            out = self.root / "fsdp.json"
            res = run_torchrun(SCRIPT, self.root, out, timeout=600)
            assert res.returncode == 0, res.stderr[-3000:]
            self.fsdp = json.loads(out.read_text())
        return self.fsdp

    def train_cli(self, family: str) -> bool:
        """`metamorph train` on a small LLaVA-format dataset, the template left at its default
        (``auto``; Qwen3 names ``chatml``): the losses fall and the final checkpoint loads."""
        data = write_colour_data(self.root / "data")
        model: dict = {
            "encoder": {
                "name": "tiny-patch",
                "kwargs": {"image_size": 16, "hidden_size": 24, "num_tokens": 4},
            },
            "backbone": {
                "name": "hf-causal-lm",
                "kwargs": {"pretrained": str(saved_backbone(self.root, family))},
            },
        }
        if family in NAMED:
            model["template"] = NAMED[family]
        out = self.root / family / "run"
        recipe = {
            "objective": {"name": "vpit", "policy": "full"},
            "model": model,
            "data": {"sources": [{"path": str(data / "train.jsonl"), "image_root": str(data)}]},
            "train": {
                "output_dir": str(out),
                "steps": 12,
                "batch_size": 6,
                "lr": 3e-3,
                "log_every": 1,
            },
        }
        path = self.root / family / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        assert cli(["train", str(path)]) == 0
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        first = rows[0]["text_loss"] + rows[0]["visual_loss"]
        last = rows[-1]["text_loss"] + rows[-1]["visual_loss"]
        assert last < 0.8 * first, f"losses {first:.3f} -> {last:.3f} in 12 steps"
        trained = MetaMorphModel.from_pretrained(out / "final")
        expected = NAMED.get(family, "auto")
        assert trained.config.template.name == expected, trained.config.template
        (answer,) = trained.generate(["What colour is this?"], max_new_tokens=4)
        assert answer.token_ids
        return True


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> Matrix:
    return Matrix(tmp_path_factory.mktemp("families"))


@pytest.mark.parametrize("family", FAMILIES)
def test_family(matrix, family):
    row = matrix.row(family)
    assert not row.failures, row.failures


def test_docs_table_is_this_run(matrix):
    versions = f"transformers {transformers.__version__}, peft " + _version("peft")
    versions += f" and torch {torch.__version__.split('+')[0]}"
    rendered = table([matrix.row(f) for f in FAMILIES], versions)
    text = DOCS.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    if os.environ.get("METAMORPH_UPDATE_DOCS") == "1":
        DOCS.write_text(text[:start] + "\n" + rendered + text[end:])
        return
    assert text[start:end].strip() == rendered.strip(), (
        "docs/backbones.md's table is not this run's result; rerun this test with "
        "METAMORPH_UPDATE_DOCS=1 to rewrite it, and read the difference before committing"
    )


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
