"""Run by test_sharded_checkpoints.py, under torchrun or in one process: a tiny VPiT run built
from a recipe, trained by the Trainer on in-memory conversations.

    sharded_script.py RECIPE OUT STEPS BATCH_SIZE [key.path=value ...]

Writes ``OUT/losses.json`` (step -> the step's losses, rank 0) and ``OUT/gathered.safetensors``
(the trained weights gathered at the end). ``SHARDED_CRASH_AT=N``: rank 0 dies while saving
step N, after every rank wrote its shards and before the checkpoint is published.
"""

import json
import os
import sys

import torch.distributed as dist
from safetensors.torch import save_file

from metamorph_core.conversation import Conversation, Turn
from metamorph_core.testing import samples
from metamorph_train import distributed, sharded_checkpoint
from metamorph_train.data import Mixture
from metamorph_train.recipe import load_recipe
from metamorph_train.runner import build_objective
from metamorph_train.trainer import Trainer


def conversations() -> list:
    two_targets = Conversation(
        [Turn("user", "draw two"), Turn("assistant", "<image> and <image>")],
        [samples.random_image(40), samples.random_image(41)],
        id="two",
    )
    return [
        samples.understanding(0),
        samples.generation(1),
        samples.text_only(),
        two_targets,
        samples.generation(2),
        samples.understanding(3),
    ]


class Recording(Trainer):
    """Keeps every step's losses."""

    losses: dict

    def _step(self, optimizer, scheduler, step):
        out = super()._step(optimizer, scheduler, step)
        self.losses[step] = {k: v for k, v in out.items() if k.endswith("_loss")}
        return out


def crash_while_saving(step: int) -> None:
    publish = sharded_checkpoint._publish

    def dying(tmp, path, config):
        if path.name.endswith(f"{step:07d}"):
            sys.stdout.flush()
            os._exit(3)
        publish(tmp, path, config)

    sharded_checkpoint._publish = dying


def main() -> None:
    recipe_path, out, steps, batch = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    if os.environ.get("SHARDED_CRASH_AT"):
        crash_while_saving(int(os.environ["SHARDED_CRASH_AT"]))
    overrides = [f"train.output_dir={out}", f"train.steps={steps}", f"train.batch_size={batch}"]
    recipe = load_recipe(recipe_path, [*overrides, *sys.argv[5:]])
    data = Mixture({"mixed": conversations()}, {"mixed": 1.0}, seed=0)
    trainer = Recording(build_objective(recipe), data, recipe.train, log=None)
    trainer.losses = {}
    if trainer.strategy == "fsdp":  # really sharded: every trainable parameter is a DTensor
        from torch.distributed.tensor import DTensor

        assert all(isinstance(p, DTensor) for p in trainer.params.values())
    trainer.run()
    names = sorted(trainer.params)
    weights = distributed.full_weights(trainer.model, names, trainer.strategy)
    if trainer.rank == 0:
        save_file({k: v.contiguous() for k, v in weights.items()}, f"{out}/gathered.safetensors")
        with open(f"{out}/losses.json", "w") as f:
            json.dump(trainer.losses, f)
    if dist.is_initialized():
        # leave without tearing gloo down (see ddp_script.py: teardown once aborted in CI)
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
