"""The trainer's settings (a recipe's ``train:`` section)."""

from __future__ import annotations

from dataclasses import dataclass


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
    seed: int = 0
    log_every: int = 10
    save_every: int = 0  # 0: only at the end
    keep_last: int = 2
    gradient_checkpointing: bool = False  # recompute the LLM's activations in backward
    strategy: str = "ddp"  # under torchrun: ddp, or fsdp (FSDP2 fully_shard of every LLM block)
    device: str = "auto"  # auto: this rank's GPU (LOCAL_RANK) when there is one, else the CPU
    # under FSDP2: ranks other than 0 build the model on the meta device (no memory for the
    # weights) and receive rank 0's weights as it is sharded; for models too big to build
    # once per rank on a host
    meta_init: bool = False
    progress: bool = True  # a progress bar on rank 0 (when logging)
