"""Sharded checkpoints under FSDP2 (torchrun, 2 CPU processes, gloo): a save cut short is never
taken for a checkpoint; a checkpoint written by 2 ranks resumes on 2 ranks and in 1 process with
the uninterrupted run's next-step losses and weights; `metamorph export` makes a model of it
equal to the gathered weights; DDP (and FSDP2 with ``fsdp_checkpoint: full``) keep writing one
file."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from metamorph_core import MetaMorphModel
from metamorph_core.cli import main
from metamorph_core.errors import CheckpointError
from metamorph_core.testing import save_tiny_backbone, torchrun_argv
from metamorph_train.checkpointing import read_weights
from metamorph_train.sharded_checkpoint import file_plan
from metamorph_train.train_state import GLOBAL_BATCH, latest_checkpoint, read_checkpoint_config

SCRIPT = Path(__file__).with_name("sharded_script.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sharded")
    backbone = save_tiny_backbone(root / "llm", "llama", seed=1)
    tree = {
        "objective": {"name": "vpit", "policy": "full"},
        "model": {
            "encoder": {
                "name": "tiny-patch",
                "kwargs": {"image_size": 16, "patch_size": 4, "hidden_size": 24, "num_tokens": 4},
            },
            "backbone": {"name": "hf-causal-lm", "kwargs": {"pretrained": str(backbone)}},
            "template": "llama3",
        },
        "data": {"sources": [{"path": "unused.jsonl"}]},  # the script draws its own items
        "train": {
            "output_dir": str(root / "unused"),
            "steps": 3,
            "grad_accum": 2,
            "lr": 1e-2,
            "warmup_ratio": 0.0,  # cosine from the first step: the scheduler must resume too
            "max_grad_norm": None,
            "save_every": 1,
            "keep_last": 3,
            "strategy": "fsdp",
            "progress": False,
        },
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _train(recipe: Path, out: Path, batch: int, *args: str, ranks: int = 2, crash: int = 0):
    """The script on ``ranks`` processes (per-rank ``batch``); returns the completed process."""
    run = [SCRIPT, recipe, out, "3", batch, *args]
    argv = torchrun_argv(*run, ranks=ranks) if ranks > 1 else [sys.executable, *map(str, run)]
    env = {**ENV, "SHARDED_CRASH_AT": str(crash)} if crash else ENV
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def _ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stderr[-3000:]


def _losses(out: Path) -> dict[str, dict[str, float]]:
    return json.loads((out / "losses.json").read_text())


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= tol, worst


def test_sharded_checkpoints_resume_on_two_ranks_and_one_and_export(recipe, tmp_path):
    straight, cut, alone = tmp_path / "straight", tmp_path / "cut", tmp_path / "alone"
    _ok(_train(recipe, straight, 2))  # 2 ranks x 2 conversations, steps 1-3 uninterrupted
    step3 = straight / "step-0000003"
    assert sorted(p.name for p in step3.iterdir()) == [
        "config.json",
        "model",
        "optimizer",
        "rng.safetensors",
    ]
    meta = json.loads((step3 / "config.json").read_text())
    assert meta["layout"] == "sharded" and meta["world"] == 2
    for part in ("model", "optimizer"):  # each rank wrote its own file of shards
        assert {p.name.split("-model-")[0] for p in (step3 / part).iterdir()} == {
            "shard-00001",
            "shard-00002",
        }
    rank1 = step3 / "model" / "shard-00002-model-00001-of-00001.safetensors"
    with safe_open(str(rank1), "pt") as f:
        stored = f.keys()
        name = next(k for k in stored if k.endswith("embed_tokens.weight"))
        rows = f.get_slice(name).get_shape()[0]
    gathered = load_file(str(straight / "gathered.safetensors"))
    assert rows < gathered[name].shape[0]  # a shard, not the whole tensor
    reference = _losses(straight)

    # rank 0 dies while publishing step 3: all shards are written, the checkpoint is not
    assert _train(recipe, cut, 2, crash=3).returncode != 0
    assert (cut / ".step-0000003.tmp-sharded" / "model").is_dir()
    assert not (cut / "step-0000003").exists()
    assert latest_checkpoint(cut) == cut / "step-0000002"
    alone.mkdir()
    shutil.copytree(cut / "step-0000002", alone / "step-0000002")

    _ok(_train(recipe, cut, 2))  # resumes step 2's checkpoint on 2 ranks
    assert list(_losses(cut)) == ["3"] and _losses(cut)["3"] == reference["3"]
    assert not list(cut.glob(".step-*"))  # the save cut short was removed
    _close(read_weights(cut / "step-0000003"), gathered, 0.0)

    _ok(_train(recipe, alone, 4, ranks=1))  # one process, the same global batch
    assert list(_losses(alone)) == ["3"]
    for term, value in reference["3"].items():
        assert abs(_losses(alone)["3"][term] - value) < 1e-5, term
    assert (alone / "step-0000003" / "weights.safetensors").is_file()  # one process: one file
    # the optimizer state was resharded too: step 3's update matches
    _close(load_file(str(alone / "step-0000003" / "weights.safetensors")), gathered, 1e-5)

    exported = tmp_path / "exported"
    assert main(["export", str(step3), str(exported), "--recipe", str(recipe)]) == 0
    model = MetaMorphModel.from_pretrained(exported)
    params = dict(model.named_parameters())
    _close({k: params[k].detach() for k in gathered}, gathered, 0.0)
    # without --recipe: the run directory's recipe.yaml (written by `metamorph train`)
    assert main(["export", str(straight), str(tmp_path / "again")]) == 2  # there is none here
    shutil.copy(recipe, straight / "recipe.yaml")
    assert main(["export", str(straight), str(tmp_path / "again")]) == 0
    again = dict(MetaMorphModel.from_pretrained(tmp_path / "again").named_parameters())
    _close({k: again[k].detach() for k in gathered}, gathered, 0.0)
    # a recipe that builds another model is refused
    assert main(["export", str(step3), str(tmp_path / "x"), "objective.policy=projector"]) == 2


@pytest.mark.parametrize("setting", ["train.strategy=ddp", "train.fsdp_checkpoint=full"])
def test_ddp_and_gathered_fsdp_write_single_file_checkpoints(recipe, tmp_path, setting):
    _ok(_train(recipe, tmp_path, 2, setting, "train.steps=1"))
    step = tmp_path / "step-0000001"
    assert sorted(p.name for p in step.iterdir()) == [
        "config.json",
        "optimizer.safetensors",
        "rng.safetensors",
        "weights.safetensors",
    ]
    assert json.loads((step / "config.json").read_text())["layout"] == "single-file"
    _close(read_weights(step), load_file(str(tmp_path / "gathered.safetensors")), 0.0)


def test_resuming_on_another_world_size_needs_the_same_global_batch(tmp_path):
    run = {"lr": 0.01, "batch_size": 2, "fsdp_checkpoint": "sharded"}
    (tmp_path / "config.json").write_text(
        json.dumps({"format": "metamorph-train-state", "world": 2, "run": run})
    )
    same = {**run, "batch_size": 4, "fsdp_checkpoint": "full"}  # storage settings may differ
    assert read_checkpoint_config(tmp_path, same, world=1)["world"] == 2
    with pytest.raises(CheckpointError, match=re.escape(f"'{GLOBAL_BATCH}': (4, 2)")):
        read_checkpoint_config(tmp_path, run, world=1)


def test_files_hold_about_one_tensor_each():
    state = {f"t{i}": torch.zeros(n) for i, n in enumerate([4, 8, 2, 4, 1])}
    plan = file_plan(state, min_bytes=0)  # at most the largest tensor (32 bytes) per file
    assert plan == {"t0": 1, "t1": 2, "t2": 3, "t3": 3, "t4": 3}
    assert set(file_plan(state).values()) == {1}  # small tensors share one file
