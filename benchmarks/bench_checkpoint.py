"""Checkpoint save and resume under FSDP2: sharded checkpoints (``train.fsdp_checkpoint:
sharded``: every rank writes and reads its own shards through ``torch.distributed.checkpoint``
and safetensors) vs today's gathered ones (``full``: weights and optimizer state gathered onto
rank 0, written by it as one file; every rank reads the whole file back), 2 ranks on the CPU
(torchrun, gloo).

The model is a stack of bias-free linear blocks behind an embedding (vocabulary 32000, width
2048, 7 blocks of 2048 -> 8192 -> 2048: 300 M parameters, fp32), each block and then the
root sharded with ``fully_shard``, built on the meta device so that a rank only ever holds its
shards; AdamW's state is filled with random values (every page resident). A save and a resume
are the trainer's own (``metamorph_train.checkpointing.save`` and ``begin``: model, optimizer,
scheduler, RNG and data position), on every rank together.

Figures, each configuration in its own torchrun (a process's peak only grows): the peak
resident memory (``VmHWM``, reset before each operation) of rank 0 and of rank 1 above what
the rank held before (its shards and the runtime), per operation, in MiB and in bytes per
model parameter; and the wall time of a save and of a resume on rank 0 (median of the
repeats). Target: during a sharded save and load, rank 0 holds no more than its shard plus
about one tensor's worth of buffer (the largest tensor: the embedding; files group tensors up
to that size, at least ``MIN_FILE_BYTES``), allowing ``RUNTIME_MIB`` for the runtime's own
allocations (DCP's plans, Python objects). The safetensors writer serialises a file twice in
memory (bytes per tensor, then the file), so a file of 1/N of the largest tensor's bytes on each
of N ranks costs 2/N of it: one tensor's worth on 2 ranks, the floor with this writer.

    .venv/bin/python benchmarks/bench_checkpoint.py [--repeats 3] [--smoke] [--blocks 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from harness import (
    Suite,
    add_common_arguments,
    command_line,
    current_rss_mib,
    peak_memory,
    reset_peak_memory,
    results_dir,
    run_json_subprocess,
)
from torch import nn

MODES = {"full": "gathered onto rank 0 (today)", "sharded": "sharded (DCP, safetensors)"}
VOCAB, WIDTH = 32000, 2048
SMOKE = {"vocab": 1000, "width": 128, "blocks": 2}
RUNTIME_MIB = 8.0


class Blocks(nn.Module):
    """An embedding and ``blocks`` bias-free MLP blocks (``width`` -> 4 ``width`` -> ``width``)."""

    def __init__(self, vocab: int, width: int, blocks: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 4 * width, bias=False), nn.Linear(4 * width, width))
            for _ in range(blocks)
        )


class _NoData:
    """The data position of a run without data."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _measured(fn: Any) -> tuple[float, float]:
    """(seconds, MiB of peak resident memory above the resident memory at the start) of
    ``fn()`` run by every rank together."""
    import torch.distributed as dist

    dist.barrier()
    base = current_rss_mib() or 0.0
    reset_peak_memory()
    start = time.perf_counter()
    fn()
    dist.barrier()
    seconds = time.perf_counter() - start
    return seconds, peak_memory().get("MiB peak RSS since reset", float("nan")) - base


def worker(args: argparse.Namespace) -> int:
    """One rank under torchrun: build, shard, fill, then save and resume ``args.repeats``
    times with ``train.fsdp_checkpoint = args.worker``; rank 0 prints one JSON line."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from metamorph_train import checkpointing, distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    with torch.device("meta"):
        model = Blocks(args.vocab, args.width, args.blocks)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(rank)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    distributed.sharded_optimizer_state(model, optimizer)  # makes AdamW's state
    local = [p.to_local() for p in model.parameters()]
    local += [v.to_local() for s in optimizer.state.values() for v in s.values() if v.dim()]
    with torch.no_grad():
        for t in local:
            t.uniform_(-1, 1, generator=g)
    trainer = SimpleNamespace(
        model=model,
        params=dict(model.named_parameters()),
        strategy="fsdp",
        rank=rank,
        world=world,
        out=Path(args.dir),
        config=SimpleNamespace(fsdp_checkpoint=args.worker, keep_last=1),
        data=_NoData(),
        loader=_NoData(),
        log=None,
        _run_signature=lambda: {"benchmark": "checkpoint"},
    )
    saves, loads = [], []
    for r in range(args.repeats):
        saves.append(
            _measured(lambda r=r: checkpointing.save(trainer, r + 1, optimizer, scheduler))
        )
        loads.append(_measured(lambda: checkpointing.begin(trainer, optimizer, scheduler)))
    mine = torch.tensor(
        [max(m for _, m in saves), max(m for _, m in loads), current_rss_mib() or 0.0],
        dtype=torch.float64,
    )
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        out = {
            "M parameters": params / 1e6,
            "MiB rank 0's shard (weights + AdamW)": sum(t.nbytes for t in local) / 2**20,
            "MiB largest tensor": max(p.numel() * p.element_size() for p in model.parameters())
            / 2**20,
            "s save (median)": statistics.median(s for s, _ in saves),
            "s resume (median)": statistics.median(s for s, _ in loads),
        }
        for k, ranked in enumerate(every):
            out[f"MiB rank {k} extra peak, save"] = float(ranked[0])
            out[f"MiB rank {k} extra peak, resume"] = float(ranked[1])
        for op in ("save", "resume"):
            out[f"B/param rank 0 extra, {op}"] = (
                out[f"MiB rank 0 extra peak, {op}"] * 2**20 / params
            )
        out["MiB rank 0 resident after"] = float(every[0][2])
        print(json.dumps(out), flush=True)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # as the tests: no gloo teardown


def run_mode(mode: str, args: argparse.Namespace, directory: Path) -> dict[str, float]:
    from metamorph_core.testing import free_port

    child = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    child += [__file__, "--worker", mode, "--dir", str(directory), "--repeats", str(args.repeats)]
    child += ["--vocab", str(args.vocab), "--width", str(args.width), "--blocks", str(args.blocks)]
    # a fixed mmap threshold: freed tensors go back to the OS at once, so that the RSS follows
    # the live tensors (glibc's adaptive threshold keeps freed blocks resident)
    env = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    return run_json_subprocess(child, 1800, env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, repeats=3)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--worker", choices=tuple(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.smoke:
        args.repeats = 1
        vars(args).update(SMOKE)
    suite = Suite("checkpoint", command_line("bench_checkpoint.py"), wait=not args.no_wait)
    cfg = {"ranks": 2, "backend": "gloo", "vocab": args.vocab, "width": args.width}
    cfg.update(blocks=args.blocks, dtype="float32", optimizer="AdamW", repeats=args.repeats)
    figures = {}
    for mode, label in MODES.items():
        with tempfile.TemporaryDirectory(prefix="metamorph-bench-ckpt-") as tmp:
            figures[mode] = run_mode(mode, args, Path(tmp))
        suite.record(f"checkpoint {label}", figures[mode], {**cfg, "fsdp_checkpoint": mode})
    full, sharded = figures["full"], figures["sharded"]
    from metamorph_train.sharded_checkpoint import MIN_FILE_BYTES

    largest = sharded["MiB largest tensor"]
    buffer = max(largest, MIN_FILE_BYTES / 2**20)
    for op in ("save", "resume"):
        extra = sharded[f"MiB rank 0 extra peak, {op}"]
        suite.target(
            f"sharded {op}: rank 0 holds its shard plus at most one tensor's worth",
            extra <= buffer + RUNTIME_MIB,
            f"{extra:,.1f} MiB above its shard vs one tensor's {buffer:,.1f} MiB + {RUNTIME_MIB:.0f} "
            f"MiB runtime (gathered: {full[f'MiB rank 0 extra peak, {op}']:,.0f} MiB)",
        )
        suite.note(
            f"{op} time: sharded {sharded[f's {op} (median)']:.2f} s vs gathered "
            f"{full[f's {op} (median)']:.2f} s"
        )
    json_path, md_path = suite.write(results_dir(args))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
