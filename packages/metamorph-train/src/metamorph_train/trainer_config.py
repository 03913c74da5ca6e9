"""The trainer's settings (a recipe's ``train:`` section)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainerConfig:
    output_dir: str
    steps: int
    batch_size: int = 8  # conversations per micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    schedule: str = "cosine"  # cosine | linear | constant
    max_grad_norm: float | None = 1.0
    bf16: bool = False
    # an exponential moving average of the trained weights (metamorph_train.ema), e.g. 0.999;
    # the run's final model holds the averages; 0: off
    ema_decay: float = 0.0
    seed: int = 0
    log_every: int = 10
    save_every: int = 0  # 0: only at the end
    keep_last: int = 2
    gradient_checkpointing: bool = False  # recompute the LLM's activations in backward
    checkpoint_every: int = 1  # with gradient_checkpointing: every N-th LLM block (1: all)
    checkpoint_offload: bool = False  # ... the activations kept for the recompute in host memory
    compile: bool = False  # torch.compile each LLM block (before FSDP2 shards it)
    strategy: str = "ddp"  # under torchrun: ddp, or fsdp (FSDP2 fully_shard of every LLM block)
    device: str = "auto"  # auto: this rank's GPU (LOCAL_RANK) when there is one, else the CPU
    # under FSDP2: ranks other than 0 build the model on the meta device (no memory for the
    # weights) and receive rank 0's weights as it is sharded; for models too big to build
    # once per rank on a host
    meta_init: bool = False
    progress: bool = True  # a progress bar on rank 0 (when logging)
    # checkpoints under FSDP2: sharded (every rank writes and reads its own shards, resumable
    # on another number of ranks; `metamorph export` makes a model of one) or full (weights and
    # optimizer gathered onto rank 0, one file); DDP and one process always write one file. How
    # a checkpoint is stored: a run may resume with the other value (train_state.STORAGE_KEYS)
    fsdp_checkpoint: str = "sharded"
    # -- experiment tracking and validation (metamorph_train.loggers, .validation); none of
    # these changes what is trained, so a run may resume with other values (TRACKING_FIELDS)
    # loggers by registry name, or {name: NAME, kwargs: {...}}: jsonl, tensorboard, wandb, mlflow
    loggers: list[Any] = field(default_factory=lambda: ["jsonl"])
    eval_every: int = 0  # validate every N steps (0: off)
    eval_batches: int = 10  # at most N batches per held-out source (0: all of it)
    eval_prompts: list[str] | str | None = None  # prompts to answer (and draw), or a file
    eval_generation: dict[str, Any] | None = None  # generation options (max_new_tokens, ...)
    eval_budget_s: float = 60.0  # stop validating after this many seconds (0: no limit)


#: TrainerConfig fields that a resumed run may change (they leave the training untouched)
TRACKING_FIELDS = (
    "gradient_checkpointing",  # how the same step is computed: memory and speed only
    "checkpoint_every",
    "checkpoint_offload",
    "compile",
    "loggers",
    "eval_every",
    "eval_batches",
    "eval_prompts",
    "eval_generation",
    "eval_budget_s",
)
