"""Run by test_distributed.py: the same training under torchrun (DDP) or in one process."""

import json
import os
import sys

import torch
import torch.distributed as dist

from metamorph_core import MetaMorphModel
from metamorph_core.conversation import Conversation, Turn
from metamorph_core.testing import samples, tiny_model_config
from metamorph_train.data import Mixture
from metamorph_train.objectives import VPiTObjective
from metamorph_train.trainer import Trainer, TrainerConfig


def conversations():
    long_text = Conversation(
        [
            Turn("user", "tell me about shapes " * 4),
            Turn("assistant", "a square has four sides " * 3),
        ],
        id="long",
    )
    two_targets = Conversation(
        [Turn("user", "draw two"), Turn("assistant", "<image> and <image>")],
        [samples.random_image(40), samples.random_image(41)],
        id="two",
    )
    return [
        samples.understanding(0),
        samples.generation(1),
        samples.text_only(),
        long_text,
        two_targets,
        samples.generation(2),
        samples.understanding(3),
        samples.text_only(),
    ]


class Recording(Trainer):
    seen: list

    def _batch(self, step, micro):
        batch = super()._batch(step, micro)
        self.seen.append(
            [int((batch["labels"][:, 1:] != -100).sum()), int(batch["target_slot_mask"].sum())]
        )
        return batch


def main() -> None:
    backbone, out, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    strategy, lora = sys.argv[4], sys.argv[5] == "lora"
    steps = int(sys.argv[6]) if len(sys.argv) > 6 else 3  # fewer: stop early, resume later
    if "RANK" in __import__("os").environ:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = MetaMorphModel.from_config(tiny_model_config(backbone))
    if lora:
        model.apply_lora(r=4, alpha=8)
    data = Mixture({"mixed": conversations()}, {"mixed": 1.0}, seed=0)
    cfg = TrainerConfig(
        output_dir=out,
        steps=steps,
        save_every=1,
        batch_size=batch_size,
        grad_accum=2,
        lr=1e-2,
        warmup_ratio=0.0,
        schedule="constant",
        max_grad_norm=None,
        strategy=strategy,
    )
    objective = VPiTObjective(model, policy="lora" if lora else "full")
    trainer = Recording(objective, data, cfg, log=None)
    trainer.seen = []
    if trainer.strategy == "fsdp":  # really sharded: every trainable parameter is a DTensor
        from torch.distributed.tensor import DTensor

        assert all(isinstance(p, DTensor) for p in trainer.params.values())
    trainer.run()
    seen = [trainer.seen]
    if dist.is_initialized():
        seen = [None] * dist.get_world_size()
        dist.all_gather_object(seen, trainer.seen)
    if trainer.rank == 0:
        with open(f"{out}/seen.json", "w") as f:
            json.dump(seen, f)
    if dist.is_initialized():
        # every rank's results are written; leave without tearing gloo down: once in CI
        # (session 5) both ranks aborted at teardown ("terminate called without an active
        # exception", SIGABRT) after a run whose training this test does not depend on
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
