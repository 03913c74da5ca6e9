"""The trainer: losses fall, accumulation is exact, checkpoints are atomic and resume is exact
even after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from metamorph_core import MetaMorphModel
from metamorph_core.errors import CheckpointError
from metamorph_core.testing import samples, save_tiny_backbone, tiny_model_config
from metamorph_encoders.testing import save_tiny_siglip2
from metamorph_train.data import Mixture
from metamorph_train.objectives import VPiTObjective
from metamorph_train.trainer import Trainer, TrainerConfig

SCRIPT = Path(__file__).with_name("train_script.py")


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return save_tiny_backbone(tmp_path_factory.mktemp("bb") / "llama", "llama", seed=1)


def _data(seed=0):
    convs = [samples.understanding(i) for i in range(6)] + [
        samples.generation(10 + i) for i in range(6)
    ]
    return Mixture({"mixed": convs}, {"mixed": 1.0}, seed=seed)


def _model(backbone, **options):
    """The VPiT objective of a fresh tiny model (``options``: VPiTObjective's)."""
    torch.manual_seed(0)
    return VPiTObjective(MetaMorphModel.from_config(tiny_model_config(backbone)), **options)


def test_a_short_full_run_lowers_both_losses(backbone, tmp_path):
    trainer = Trainer(
        _model(backbone),
        _data(),
        TrainerConfig(output_dir=str(tmp_path), steps=30, batch_size=6, lr=3e-3, log_every=1),
        log=None,
    )
    trainer.run()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 30
    first, last = rows[:3], rows[-3:]
    for key in ("text_loss", "visual_loss"):
        assert sum(r[key] for r in last) < 0.75 * sum(r[key] for r in first), key  # measured 0.64
    assert not any(n.startswith("encoder.") for n in trainer.params)
    assert (tmp_path / "step-0000030" / "weights.safetensors").is_file()


def test_accumulation_normalises_by_all_tokens_of_the_step(backbone, tmp_path):
    """Splitting a step into micro-batches, or recomputing activations, changes nothing."""
    weights = []
    for batch, accum, ckpt in ((8, 1, False), (4, 2, False), (2, 4, False), (4, 2, True)):
        t = Trainer(
            _model(backbone),
            _data(),
            TrainerConfig(
                output_dir=str(tmp_path / f"{batch}x{accum}-{ckpt}"),
                steps=1,
                batch_size=batch,
                grad_accum=accum,
                lr=1e-2,
                warmup_ratio=0.0,
                schedule="constant",
                gradient_checkpointing=ckpt,
            ),
            log=None,
        )
        t.run()
        weights.append({k: v.detach().clone() for k, v in t.params.items()})
    for other in weights[1:]:
        assert all(torch.allclose(weights[0][k], other[k], atol=1e-6) for k in other)


def test_checkpointing_policies_and_compiled_blocks_change_nothing(backbone, tmp_path, monkeypatch):
    """Every other block recomputed, recomputed from host memory, or each block compiled:
    the step's weights are the plain step's. (Compiled with dynamo's eager backend: inductor
    takes a minute on the CPU; the graph capture and the module wiring are what is tested.)"""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **k: real(fn, backend="eager"))
    runs = [
        {},
        {"gradient_checkpointing": True, "checkpoint_every": 2},
        {"gradient_checkpointing": True, "checkpoint_offload": True},
        {"compile": True},
    ]
    weights = []
    for i, extra in enumerate(runs):
        base = {"steps": 1, "batch_size": 8, "lr": 1e-2, "warmup_ratio": 0.0}
        config = TrainerConfig(output_dir=str(tmp_path / str(i)), **base, **extra)
        t = Trainer(_model(backbone), _data(), config, log=None)
        blocks = t.objective.shard_units()
        if extra.get("checkpoint_every") == 2:
            assert [b.gradient_checkpointing for b in blocks] == [True, False]
        if extra.get("compile"):
            assert all(b._compiled_call_impl is not None for b in blocks)
        t.run()
        weights.append({k: v.detach().clone() for k, v in t.params.items()})
    for other in weights[1:]:
        assert all(torch.allclose(weights[0][k], other[k], atol=1e-6) for k in other)
    bad = {"output_dir": str(tmp_path / "bad"), "steps": 1}
    with pytest.raises(ValueError, match="set train.gradient_checkpointing: true"):
        Trainer(_model(backbone), _data(), TrainerConfig(**bad, checkpoint_every=2), log=None)
    with pytest.raises(ValueError, match="checkpoint_every must be an integer >= 1"):
        Trainer(_model(backbone), _data(), TrainerConfig(**bad, checkpoint_every=0), log=None)


def test_sigkill_then_resume_ends_with_the_same_weights(backbone, tmp_path):
    straight = subprocess.run(
        [sys.executable, str(SCRIPT), str(backbone), str(tmp_path / "a"), "8", "0"],
        capture_output=True,
        text=True,
    )
    assert straight.returncode == 0, straight.stderr
    cmd = [sys.executable, str(SCRIPT), str(backbone), str(tmp_path / "b"), "8", "0.03"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (tmp_path / "b" / "step-0000004" / "config.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "step-0000008").exists()
    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "a" / "step-0000008" / "weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "step-0000008" / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # only the last two checkpoints are kept, and no temporary directory is left
    assert sorted(
        p.name for p in (tmp_path / "b").iterdir() if p.name.startswith(("step", "."))
    ) == ["step-0000006", "step-0000008"]


def test_resuming_another_runs_directory_is_refused(backbone, tmp_path):
    cfg = TrainerConfig(output_dir=str(tmp_path), steps=2, batch_size=2, lr=1e-3)
    Trainer(_model(backbone), _data(), cfg, log=None).run()
    other = TrainerConfig(output_dir=str(tmp_path), steps=4, batch_size=2, lr=5e-4)
    with pytest.raises(
        CheckpointError, match=r"another run configuration.*'lr': \(0.001, 0.0005\)"
    ):
        Trainer(_model(backbone), _data(), other, log=None).run()


def test_prompt_dropout_drops_only_generation_prompts(backbone, tmp_path):
    trainer = Trainer(
        _model(backbone, prompt_dropout=0.5),
        _data(),
        TrainerConfig(output_dir=str(tmp_path), steps=1, batch_size=12),
        log=None,
    )
    seen = []
    trainer.model.prepare_batch = lambda items, pack_to=None: seen.extend(items) or {}
    trainer._batch(1, 0)
    gen = [c for c in seen if c.has_target_image]
    dropped = [c for c in gen if c.turns[0].content == ""]
    assert 0 < len(dropped) < len(gen)
    assert all(c.turns[0].content for c in seen if not c.has_target_image)


def test_bf16_autocast_step_runs_and_learns(backbone, tmp_path):
    t = Trainer(
        _model(backbone),
        _data(),
        TrainerConfig(
            output_dir=str(tmp_path), steps=8, batch_size=6, lr=3e-3, bf16=True, log_every=1
        ),
        log=None,
    )
    t.run()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["text_loss"] == r["text_loss"] for r in rows)  # no NaN
    assert rows[-1]["visual_loss"] < rows[0]["visual_loss"]
    assert next(iter(t.params.values())).dtype == torch.float32  # fp32 masters


def test_visual_input_noise_reaches_the_model_from_the_steps_seed(backbone, tmp_path):
    cfg = TrainerConfig(output_dir=str(tmp_path), steps=1, batch_size=12)
    trainer = Trainer(_model(backbone, visual_input_noise=0.5), _data(), cfg, log=None)
    convs = [samples.understanding(0), samples.generation(1)]
    batch = trainer.objective.batch(convs, seed=17)
    assert batch["input_noise"] == (0.5, 17)
    losses = [trainer.objective.loss_sums(trainer.model, batch)[1].item() for _ in range(2)]
    assert losses[0] == losses[1]  # the same step's seed draws the same noise (exact resume)
    off = TrainerConfig(output_dir=str(tmp_path / "o"), steps=1)
    off = Trainer(_model(backbone), _data(), off, log=None)
    assert "input_noise" not in off.objective.batch(convs, seed=17)
    with pytest.raises(ValueError, match="visual_input_noise must be >= 0"):
        _model(backbone, visual_input_noise=-1.0)


def test_the_trainer_logs_which_parameter_groups_train(backbone, tmp_path):
    lines = []
    cfg = TrainerConfig(output_dir=str(tmp_path), steps=1, batch_size=2)
    Trainer(_model(backbone, policy="projector"), _data(), cfg, log=lines.append)
    training, frozen = lines[:2]
    # stage 1: the projector and the image tokens' two embedding rows (d = 32)
    assert training.startswith("training: backbone (1 tensor, 64 parameters), projector (4 ")
    assert "head" not in training
    for group in ("backbone", "encoder", "head"):
        assert f"{group} (" in frozen
    Trainer(_model(backbone), _data(), cfg, log=lines.append)  # policy full: all but the encoder
    training, frozen = lines[-2:]
    assert all(f"{g} (" in training for g in ("backbone", "head", "projector"))
    assert frozen.startswith("frozen: encoder (")


def test_the_trainer_takes_an_objective(backbone, tmp_path):
    model = _model(backbone).module
    cfg = TrainerConfig(output_dir=str(tmp_path), steps=1)
    with pytest.raises(TypeError, match=r"VPiTObjective\(model, policy='full'\)"):
        Trainer(model, _data(), cfg, log=None)
    with pytest.raises(ValueError, match="policy 'lora' trains LoRA weights, but the model"):
        VPiTObjective(model, policy="lora")


def test_siglip2_naflex_images_of_different_shapes_train_through_the_workers(backbone, tmp_path):
    """A NaFlex encoder's preprocess gives fields, not a pixel tensor: the loader's worker
    preprocesses image by image, keeping aspect ratios, and the batch stacks field by field."""
    tower = save_tiny_siglip2(tmp_path / "siglip2")
    enc = {"name": "siglip2", "kwargs": {"pretrained": str(tower), "num_tokens": 4}}
    torch.manual_seed(0)
    model = MetaMorphModel.from_config(tiny_model_config(backbone, encoder=enc))
    g = torch.Generator().manual_seed(0)
    convs = [
        replace(samples.understanding(i), images=[torch.rand(3, 40, 24, generator=g)])
        for i in range(3)
    ]
    convs += [
        replace(samples.generation(i), images=[torch.rand(3, 20, 48, generator=g)])
        for i in range(3)
    ]
    cfg = TrainerConfig(output_dir=str(tmp_path / "run"), steps=2, batch_size=6, log_every=1)
    trainer = Trainer(
        VPiTObjective(model), Mixture({"a": convs}, {"a": 1.0}), cfg, log=None, num_workers=1
    )
    made = []

    def batch(items, seed, make=trainer.objective.batch):
        made.append(make(items, seed))
        return made[-1]

    trainer.objective.batch = batch
    trainer.run()
    grids = {tuple(s) for b in made for s in b["pixel_values"]["spatial_shapes"].tolist()}
    assert grids == {(10, 6), (5, 12)}
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["visual_loss"] > 0 and r["text_loss"] > 0 for r in rows)
