"""torchrun with 2 CPU processes (gloo; DDP, FSDP2, and LoRA under FSDP2 stopped after one step
and resumed) matches one process on the same global batch, on data where the ranks hold
different numbers of text tokens and target images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from metamorph_core.testing import run_torchrun, save_tiny_backbone
from metamorph_train.checkpointing import read_weights

SCRIPT = Path(__file__).with_name("ddp_script.py")


@pytest.mark.parametrize(
    ("strategy", "lora"), [("ddp", "full"), ("fsdp", "full"), ("fsdp", "lora")]
)
def test_two_processes_match_one(tmp_path, strategy, lora):
    backbone = save_tiny_backbone(tmp_path / "bb", "llama", seed=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, str(SCRIPT), str(backbone), str(tmp_path / "one"), "4", "ddp", lora],
        capture_output=True,
        text=True,
        env=env,
    )
    assert single.returncode == 0, single.stderr[-3000:]

    def two_processes(*steps: str) -> None:
        two = run_torchrun(SCRIPT, backbone, tmp_path / "two", "2", strategy, lora, *steps, env=env)
        assert two.returncode == 0, two.stderr[-3000:]

    if strategy == "fsdp" and lora == "lora":  # stop after step 1, resume under FSDP2
        two_processes("1")
        assert [p.name for p in (tmp_path / "two").glob("step-*")] == ["step-0000001"]
        two_processes()
        rank0, _ = json.loads((tmp_path / "two" / "seen.json").read_text())
        assert len(rank0) == 2 * 2  # only steps 2 and 3 (2 micro-batches each) ran again
        a = load_file(str(tmp_path / "one" / "step-0000003" / "weights.safetensors"))
        b = read_weights(tmp_path / "two" / "step-0000003")  # sharded under FSDP2
        assert a.keys() == b.keys() and any("lora_" in k for k in a)
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst < 1e-5, worst
        return
    two_processes()
    rank0, rank1 = json.loads((tmp_path / "two" / "seen.json").read_text())
    assert any(a[0] != b[0] for a, b in zip(rank0, rank1, strict=True))  # text tokens differ
    assert any(a[1] != b[1] for a, b in zip(rank0, rank1, strict=True))  # target tokens differ
    whole = json.loads((tmp_path / "one" / "seen.json").read_text())[0]
    assert [a[0] + b[0] for a, b in zip(rank0, rank1, strict=True)] == [w[0] for w in whole]
    a = load_file(str(tmp_path / "one" / "step-0000003" / "weights.safetensors"))
    b = read_weights(tmp_path / "two" / "step-0000003")  # either layout (FSDP2: sharded)
    assert a.keys() == b.keys()
    if lora == "lora":
        assert any("lora_" in k for k in a) and any("trainable_tokens" in k for k in a)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst
