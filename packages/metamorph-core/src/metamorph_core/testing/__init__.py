"""Helpers for tests of metamorph and of third-party plugins: tiny real models saved with
``save_pretrained`` (no downloads), conformance checks that any component can run, and a local
Hub cache to load repo ids from offline (:mod:`metamorph_core.testing.hub`)."""

import os
import subprocess

from metamorph_core.testing import samples
from metamorph_core.testing.conformance import check_encoder
from metamorph_core.testing.hub import offline_hub, populate_hub_cache
from metamorph_core.testing.tiny import (
    TINY_FAMILIES,
    TinyFamily,
    build_tiny_tokenizer,
    save_tiny_backbone,
    tiny_model_config,
)


def free_port() -> int:
    """A local TCP port nobody listens on now, for torchrun's ``--master_port`` in tests
    (fixed ports collide between consecutive runs)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_argv(*args: object, ranks: int = 2) -> list[str]:
    """The argv that runs ``args`` (a script and its arguments, or ``-m module ...``; paths and
    numbers as their ``str``) on ``ranks`` local processes under torchrun, on a free master
    port."""
    import sys

    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}"]
    return [*launch, f"--master_port={free_port()}", *map(str, args)]


def run_torchrun(
    *args: object, ranks: int = 2, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run :func:`torchrun_argv` to completion, one thread a rank (``OMP_NUM_THREADS=1``, over
    ``env`` or the current environment), output captured as text."""
    env = {**(os.environ if env is None else env), "OMP_NUM_THREADS": "1"}
    argv = torchrun_argv(*args, ranks=ranks)
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)


__all__ = [
    "free_port",
    "TINY_FAMILIES",
    "TinyFamily",
    "build_tiny_tokenizer",
    "check_encoder",
    "offline_hub",
    "populate_hub_cache",
    "run_torchrun",
    "samples",
    "save_tiny_backbone",
    "tiny_model_config",
    "torchrun_argv",
]
