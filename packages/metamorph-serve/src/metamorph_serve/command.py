"""``metamorph serve CHECKPOINT``: the HTTP API and the chat page for a MetaMorph checkpoint."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from metamorph_core.cli import Run

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def configure(parser: argparse.ArgumentParser) -> Run:
    p = parser
    p.add_argument("checkpoint", help="a MetaMorph checkpoint directory")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("METAMORPH_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $METAMORPH_API_KEY; none when unset)",
    )
    p.add_argument(
        "--model-name",
        default=None,
        help="the model's id in the API (default: the directory's name)",
    )
    p.add_argument(
        "--device", default="auto", help="auto (a GPU when there is one), cpu, cuda:0 ..."
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="the LLM's weights and compute (default: as saved); bfloat16 halves the weight "
        "traffic of each step and batches better where the hardware has bf16 units",
    )
    g = p.add_argument_group("batching")
    g.add_argument("--max-batch", type=int, default=8, help="requests generated together")
    g.add_argument(
        "--batch-wait-ms", type=float, default=10.0, help="wait for more requests to join a batch"
    )
    g.add_argument(
        "--continuous-batching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="requests arriving while a batch runs join it at the next step (default); "
        "--no-continuous-batching: they wait for the next batch",
    )
    g.add_argument(
        "--static-cache",
        action="store_true",
        help="allocate each batch's KV cache once (same shapes every step); requests then join "
        "at the next batch, not mid-batch",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="compile the per-token step on a static cache (CUDA graphs on a GPU: the first "
        "batch of each size compiles); implies --static-cache",
    )
    g.add_argument("--max-queue", type=int, default=64, help="waiting requests; beyond: 429")
    g = p.add_argument_group("limits (each refused with a 4xx naming it)")
    g.add_argument("--max-tokens", type=int, default=1024, help="most tokens an answer may ask for")
    g.add_argument("--default-max-tokens", type=int, default=256)
    g.add_argument("--max-request-mb", type=float, default=20.0)
    g.add_argument("--max-image-pixels", type=int, default=4096 * 4096)
    g.add_argument("--max-images", type=int, default=8, help="input images per request")
    g.add_argument("--max-n", type=int, default=4, help="images per /v1/images/generations request")
    g.add_argument("--max-decoder-steps", type=int, default=250, help="denoising steps per image")
    g.add_argument(
        "--timeout", type=float, default=300.0, help="seconds per request, queueing included"
    )
    g.add_argument(
        "--allow-local-images",
        default=None,
        metavar="DIR",
        help="let requests name image files inside DIR (default: never read a file)",
    )
    return run


def run(args: argparse.Namespace) -> int:
    import signal
    import threading
    import time
    from pathlib import Path

    import torch
    import uvicorn

    from metamorph_core import MetaMorphModel
    from metamorph_serve.app import create_app
    from metamorph_serve.settings import ServeSettings

    settings = ServeSettings(
        api_key=args.api_key or None,
        model_name=args.model_name or Path(args.checkpoint).resolve().name,
        max_batch=args.max_batch,
        batch_wait_s=args.batch_wait_ms / 1000,
        continuous_batching=args.continuous_batching,
        cache_implementation="static" if args.static_cache or args.compile else "dynamic",
        compile=args.compile,
        max_queue=args.max_queue,
        max_request_bytes=int(args.max_request_mb * 1024 * 1024),
        max_image_pixels=args.max_image_pixels,
        max_images=args.max_images,
        max_tokens=args.max_tokens,
        default_max_tokens=min(args.default_max_tokens, args.max_tokens),
        max_n=args.max_n,
        max_decoder_steps=args.max_decoder_steps,
        timeout_s=args.timeout,
        allow_local_images=Path(args.allow_local_images) if args.allow_local_images else None,
    )
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = MetaMorphModel.from_pretrained(args.checkpoint, dtype=args.dtype).to(device).eval()
    if args.host not in LOOPBACK and settings.api_key is None:
        print(
            f"warning: serving on {args.host} without an API key: anyone who reaches this "
            "address can use the model (set --api-key or METAMORPH_API_KEY)",
            file=sys.stderr,
        )
    app = create_app(model, settings, log=lambda m: print(m, file=sys.stderr), engine_thread=False)
    # HTTP in a thread, generation in this (the main) thread: see Engine
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info"))
    http = threading.Thread(target=server.run, name="metamorph-http", daemon=True)
    http.start()
    while not server.started:
        if not http.is_alive():  # it could not start (the port is taken ...): said above
            return 1
        time.sleep(0.05)
    decoder = "with a visual decoder" if model.decoder is not None else "without a visual decoder"
    print(f"serving '{settings.model_name}' ({decoder}) on http://{args.host}:{args.port}/")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        app.state.engine.run()
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        app.state.engine.close()  # waiting requests are answered 503
        server.should_exit = True
        http.join(timeout=30)
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM stops the server as Ctrl-C does."""
    raise KeyboardInterrupt
