"""The moving average of the trained weights (``train.ema_decay``): its arithmetic, that the
final model holds it, that resuming continues it exactly and that export reads it."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from metamorph_core import MetaMorphModel
from metamorph_core.errors import CheckpointError
from metamorph_core.testing import samples, save_tiny_backbone, tiny_model_config
from metamorph_train.checkpointing import load_trained_weights
from metamorph_train.data import Mixture
from metamorph_train.ema import WeightAverage, ema_rate
from metamorph_train.objectives import VPiTObjective
from metamorph_train.trainer import Trainer, TrainerConfig

STEPS = 6


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return save_tiny_backbone(tmp_path_factory.mktemp("bb") / "llama", "llama", seed=1)


def _objective(backbone):
    torch.manual_seed(0)
    return VPiTObjective(MetaMorphModel.from_config(tiny_model_config(backbone)))


def _data():
    convs = [samples.understanding(i) for i in range(4)] + [
        samples.generation(10 + i) for i in range(4)
    ]
    return Mixture({"mixed": convs}, {"mixed": 1.0}, seed=0)


def _config(out, **kw):
    return TrainerConfig(output_dir=str(out), steps=STEPS, batch_size=4, lr=3e-3, log_every=1, **kw)


def test_the_rate_warms_up_then_holds_the_decay():
    assert ema_rate(0.999, 1) == pytest.approx(2 / 11)
    assert ema_rate(0.999, 90) == pytest.approx(91 / 100)
    assert ema_rate(0.999, 100_000) == 0.999
    with pytest.raises(ValueError, match="train.ema_decay must be between 0 and 1"):
        WeightAverage({"w": torch.nn.Parameter(torch.zeros(2))}, 1.5)


def test_the_average_follows_the_parameters_by_its_rate():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    average = WeightAverage({"p": p}, 0.9)
    expected = torch.zeros(3)
    for k, value in enumerate([1.0, 2.0, 4.0, -1.0], start=1):
        p.data.fill_(value)
        average.update()
        d = ema_rate(0.9, k)
        expected = d * expected + (1 - d) * value
    assert average.average["p"].dtype == torch.float32
    assert torch.allclose(average.average["p"], expected)
    average.copy_to_params()
    assert torch.allclose(p.float(), expected.to(torch.bfloat16).float())


def test_the_final_model_holds_the_average_of_the_steps_weights(backbone, tmp_path):
    # the same run without the average, a checkpoint every step: its weights step by step
    raw = Trainer(
        _objective(backbone),
        _data(),
        _config(tmp_path / "raw", save_every=1, keep_last=STEPS),
        log=None,
    )
    initial = {n: p.detach().float().clone() for n, p in raw.params.items()}
    raw.run()
    expected = dict(initial)
    for k in range(1, STEPS + 1):
        w = load_file(str(tmp_path / "raw" / f"step-{k:07d}" / "weights.safetensors"))
        d = ema_rate(0.8, k)
        expected = {n: d * expected[n] + (1 - d) * w[n].float() for n in expected}
    averaged = Trainer(
        _objective(backbone), _data(), _config(tmp_path / "ema", ema_decay=0.8), log=None
    )
    averaged.run()
    last = tmp_path / "ema" / f"step-{STEPS:07d}"
    # training is the same: the checkpoint's weights are the raw run's last ones
    w_raw = load_file(str(tmp_path / "raw" / f"step-{STEPS:07d}" / "weights.safetensors"))
    w_ema_run = load_file(str(last / "weights.safetensors"))
    assert all(torch.equal(w_raw[n], w_ema_run[n]) for n in w_raw)
    for n, p in averaged.params.items():  # the model now holds the averages
        assert torch.allclose(p.float(), expected[n], atol=1e-6), n
        assert not torch.allclose(p.float(), w_raw[n].float(), atol=1e-6), n
    # export reads the averages, as the run's final model
    fresh = _objective(backbone)
    meta = load_trained_weights(last, fresh)
    assert meta["averaged"]
    params = dict(fresh.module.named_parameters())
    assert all(torch.equal(params[n], averaged.params[n]) for n in averaged.params)


def test_resuming_continues_the_average_exactly(backbone, tmp_path):
    Trainer(_objective(backbone), _data(), _config(tmp_path / "a", ema_decay=0.8), log=None).run()
    cfg = _config(tmp_path / "b", ema_decay=0.8, save_every=2, keep_last=3)
    Trainer(_objective(backbone), _data(), cfg, log=None).run()
    shutil.rmtree(tmp_path / "b" / f"step-{STEPS:07d}")  # as if killed after step 4
    Trainer(_objective(backbone), _data(), cfg, log=None).run()
    a = load_file(str(tmp_path / "a" / f"step-{STEPS:07d}" / "ema.safetensors"))
    b = load_file(str(tmp_path / "b" / f"step-{STEPS:07d}" / "ema.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert int(b["ema::updates"].item()) == STEPS


def test_a_run_without_the_average_is_not_resumed_with_one(backbone, tmp_path):
    Trainer(_objective(backbone), _data(), _config(tmp_path), log=None).run()
    with pytest.raises(CheckpointError, match="ema_decay"):
        Trainer(_objective(backbone), _data(), _config(tmp_path, ema_decay=0.9), log=None).run()
