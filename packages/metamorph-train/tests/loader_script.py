"""Run by test_loader.py under torchrun (2 ranks, gloo): VPiT training from a mixture of a
JSONL file (read whole and streamed), a webdataset and a parquet source, images read by ``num_workers`` loader workers per
rank; each micro-batch waits ``delay`` seconds so the test can kill the run between
checkpoints."""

import os
import sys
import time

import torch
import torch.distributed as dist

from metamorph_core import MetaMorphModel
from metamorph_core.testing import tiny_model_config
from metamorph_train.data import ConversationDataset, Mixture
from metamorph_train.objectives import VPiTObjective
from metamorph_train.trainer import Trainer, TrainerConfig


class Slow(Trainer):
    delay = 0.0

    def _batch(self, step, micro):
        time.sleep(self.delay)
        return super()._batch(step, micro)


def main() -> None:
    backbone, world, out, workers, delay = sys.argv[1:6]
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = MetaMorphModel.from_config(tiny_model_config(backbone))
    sources = {
        "j": ConversationDataset(f"{world}/r.jsonl", f"{world}/img", seed=1),
        "w": ConversationDataset(f"{world}/r-webdataset", format="webdataset", seed=2),
        "p": ConversationDataset(f"{world}/r-parquet", format="parquet", seed=3),
        "s": ConversationDataset(f"{world}/r.jsonl", f"{world}/img", streaming=True, seed=4),
    }
    data = Mixture(sources, dict.fromkeys(sources, 1.0), seed=0)
    cfg = TrainerConfig(
        output_dir=out, steps=12, save_every=2, batch_size=2, lr=1e-2, warmup_ratio=0.0
    )
    trainer = Slow(
        VPiTObjective(model, prompt_dropout=0.3), data, cfg, log=None, num_workers=int(workers)
    )
    trainer.delay = float(delay)
    trainer.run()
    if dist.is_initialized():  # as ddp_script.py: leave without tearing gloo down
        dist.barrier()
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
