"""The server's limits and switches (:class:`ServeSettings`): safe by default."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from metamorph_core.generation import GenerationConfig


@dataclass(frozen=True)
class ServeSettings:
    """``api_key``: required as ``Authorization: Bearer KEY`` on every API route (not on
    ``/health`` and the chat page's static files, which hold no data); ``None``: no key.
    ``max_batch``: requests generated together; ``batch_wait_s``: how long the engine waits
    for more requests to join a batch it is about to start; ``continuous_batching``: requests
    arriving while a batch runs join it at the next step (else they wait for the next batch).
    ``cache_implementation``: the KV cache generation uses (``"static"``: allocated once per
    batch, same shapes every step); ``compile``: the per-token step compiled on a static cache
    (CUDA graphs on a GPU). A static cache cannot take requests mid-batch: with it, requests
    join at the next batch whatever ``continuous_batching`` says. Limits, each refused with a 4xx
    naming it: ``max_queue`` requests waiting (429 beyond), ``max_request_bytes`` of body,
    ``max_image_pixels`` per input image, ``max_images`` per request, ``max_tokens`` per
    answer (``default_max_tokens`` when a request names none), ``max_n`` images per image
    request, ``max_decoder_steps`` denoising steps per image, ``timeout_s`` per request (queueing included; the answer so far is returned with
    finish reason ``"timeout"``). ``allow_local_images``: a directory whose files requests may
    name as images (``file://`` URLs or paths inside it); ``None``: no file is ever read."""

    api_key: str | None = None
    model_name: str = "metamorph"
    max_batch: int = 8
    batch_wait_s: float = 0.01
    continuous_batching: bool = True
    cache_implementation: str = "dynamic"
    compile: bool = False
    max_queue: int = 64
    max_request_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_images: int = 8
    max_tokens: int = 1024
    default_max_tokens: int = 256
    max_n: int = 4
    max_decoder_steps: int = 250
    timeout_s: float = 300.0
    allow_local_images: Path | None = None

    def __post_init__(self) -> None:
        positive = {
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
            "max_request_bytes": self.max_request_bytes,
            "max_image_pixels": self.max_image_pixels,
            "max_tokens": self.max_tokens,
            "default_max_tokens": self.default_max_tokens,
            "max_n": self.max_n,
            "max_decoder_steps": self.max_decoder_steps,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"serve setting {name} must be an integer >= 1, got {value!r}")
        if self.max_images < 0 or self.batch_wait_s < 0 or self.timeout_s <= 0:
            raise ValueError(
                "serve settings max_images and batch_wait_s must be >= 0 and timeout_s > 0, got "
                f"{self.max_images}, {self.batch_wait_s}, {self.timeout_s}"
            )
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens "
                f"({self.max_tokens})"
            )
        # the generation options checked as generation checks them
        GenerationConfig(cache_implementation=self.cache_implementation, compile=self.compile)
        if self.allow_local_images is not None and not Path(self.allow_local_images).is_dir():
            raise ValueError(f"--allow-local-images '{self.allow_local_images}' is not a directory")
