"""A small training run used by test_trainer.py in subprocesses (so it can be SIGKILLed)."""

import sys
import time

import torch

from metamorph_core import MetaMorphModel
from metamorph_core.testing import samples, tiny_model_config
from metamorph_train.data import Mixture
from metamorph_train.objectives import VPiTObjective
from metamorph_train.trainer import Trainer, TrainerConfig


class Slow(list):
    """Items arrive slowly, so a test can kill the run between checkpoints."""

    def __getitem__(self, i):
        time.sleep(float(sys.argv[4]))
        return super().__getitem__(i)


def conversations():
    convs = [samples.understanding(i) for i in range(6)] + [
        samples.generation(10 + i) for i in range(6)
    ]
    return convs + [samples.text_only()]


def main() -> None:
    backbone, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.manual_seed(0)
    model = MetaMorphModel.from_config(tiny_model_config(backbone))
    data = Mixture({"mixed": Slow(conversations())}, {"mixed": 1.0}, seed=0)
    cfg = TrainerConfig(
        output_dir=out,
        steps=steps,
        batch_size=4,
        grad_accum=2,
        lr=3e-3,
        save_every=2,
        keep_last=2,
        log_every=1,
    )
    summary = Trainer(VPiTObjective(model), data, cfg, log=None).run()
    print("done", summary["step"])


if __name__ == "__main__":
    main()
