"""The OpenAI-style wire format: requests checked and turned into generation jobs, results
turned into responses. Every problem with a request is an :class:`ApiError` (a 4xx naming the
field, what was wrong and what to send instead); nothing a client sends reaches the model
unchecked.

Chat (``POST /v1/chat/completions``): ``messages`` with ``role`` ``system`` / ``user`` /
``assistant`` and ``content`` a string or a list of parts ``{"type": "text", "text": ...}`` and
``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``; the last message
is the user's. Sampling: ``max_tokens`` (or ``max_completion_tokens``), ``temperature`` (absent
or 0: greedy), ``top_p``, ``top_k``, ``seed``, ``stop``. MetaMorph's own options go in a
``metamorph`` object: ``visual_guidance_scale``, ``image`` (the answer is one image),
``response_prefix``, ``decoder`` (``scheduler``, ``steps``, ``guidance_scale``, ``seed``),
``return_visual_tokens``, ``decode_images`` (default: when a decoder is attached) and
``ignore_eos`` (generate ``max_tokens`` whatever the model says, as vLLM's option of that name:
for benchmarks).

An answer's content is its text, or, when it holds images, a list of parts in order: text
parts, ``image_url`` parts with PNG data URLs, and on request ``visual_tokens`` parts
(``{"type": "visual_tokens", "visual_tokens": {"shape": [n, c], "dtype": "float32",
"data": base64 of the little-endian floats}}``).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from metamorph_core.conversation import IMAGE_PLACEHOLDER, Conversation, Turn
from metamorph_core.decoding import DecodeConfig
from metamorph_core.generation import GenerationConfig
from metamorph_serve.settings import ServeSettings


class ApiError(Exception):
    """A request the server refuses: ``status`` (4xx), a message naming the field and the fix,
    the field's ``param`` path and an error ``type``."""

    def __init__(
        self, status: int, message: str, param: str | None = None, kind: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or {
            400: "invalid_request_error",
            401: "authentication_error",
            404: "not_found_error",
            413: "request_too_large",
            429: "rate_limit_error",
            503: "server_busy",
        }.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param}}


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


# OpenAI fields this server reads; ACCEPTED_DEFAULTS: fields it does not implement but takes
# at their no-op value, because clients send them by default
CHAT_FIELDS = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "top_k", "seed", "stop", "stream", "stream_options", "n", "user", "metamorph",
}  # fmt: skip
ACCEPTED_DEFAULTS = {
    "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None),
    "logprobs": (False, None),
    "logit_bias": (None,),
    "parallel_tool_calls": (None,),
}
IMAGES_FIELDS = {"model", "prompt", "n", "size", "response_format", "user", "metamorph"}
IMAGES_DEFAULTS = {"quality": (None, "standard", "auto"), "style": (None,)}
META_FIELDS = {
    "visual_guidance_scale", "image", "response_prefix", "decoder", "return_visual_tokens",
    "decode_images", "ignore_eos",
}  # fmt: skip


def _check_fields(body: Any, known: set[str], defaults: dict[str, tuple], where: str) -> None:
    if not isinstance(body, dict):
        raise _bad(f"the {where} body must be a JSON object")
    for key, value in body.items():
        if key in known:
            continue
        if key in defaults and value in defaults[key]:
            continue
        if key in defaults:
            raise _bad(f"'{key}' is not supported by this server; leave it out", key)
        raise _bad(
            f"unknown field '{key}' in the {where}; the fields read are {sorted(known)}", key
        )


def _number(body: dict, key: str, low: float, high: float, integer: bool = False) -> Any:
    value = body.get(key)
    if value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or not low <= value <= high or not math.isfinite(value):
        kind = "an integer" if integer else "a number"
        raise _bad(f"'{key}' must be {kind} in [{low}, {high}], got {value!r}", key)
    return value


# -- images --------------------------------------------------------------------------------
def load_image(url: Any, settings: ServeSettings, param: str) -> Any:
    """A request's image (a data URL, or a local file when ``allow_local_images`` permits)
    as an RGB PIL image, its size checked before its pixels are decoded."""
    from PIL import Image

    if not isinstance(url, str) or not url:
        raise _bad("an image_url must hold a non-empty 'url' string", param)
    if url.startswith("data:"):
        head, sep, payload = url.partition(",")
        if not sep or ";base64" not in head:
            raise _bad("a data URL must be 'data:image/...;base64,<data>'", param)
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise _bad(f"the image's base64 data is malformed ({e})", param) from e
        source: Any = io.BytesIO(raw)
    elif url.startswith(("http://", "https://")):
        raise _bad(
            "this server does not fetch remote URLs; send the image as a data URL "
            "(data:image/png;base64,...)",
            param,
        )
    else:
        source = _local_image(url, settings, param)
    try:
        with Image.open(source) as image:
            w, h = image.size
            if w * h > settings.max_image_pixels:
                raise ApiError(
                    413,
                    f"the image is {w}x{h} = {w * h} pixels, above the limit of "
                    f"{settings.max_image_pixels} (--max-image-pixels); send a smaller one",
                    param,
                )
            return image.convert("RGB")
    except ApiError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise _bad(f"the image cannot be read ({type(e).__name__}: {e})", param) from e


def _local_image(url: str, settings: ServeSettings, param: str) -> Path:
    root = settings.allow_local_images
    if root is None:
        raise _bad(
            "local files are not read by this server (start it with --allow-local-images DIR "
            "to allow files inside DIR); send the image as a data URL",
            param,
        )
    path = Path(url.removeprefix("file://"))
    base = Path(root).resolve()
    full = (path if path.is_absolute() else base / path).resolve()
    if not full.is_relative_to(base):
        raise ApiError(403, f"'{url}' is outside the allowed image directory", param, "forbidden")
    if not full.is_file():
        raise _bad(f"'{url}': no such file in the allowed image directory", param)
    return full


def png_b64(image: Any) -> str:
    """A PIL image as base64 PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def png_data_url(image: Any) -> str:
    return "data:image/png;base64," + png_b64(image)


def tokens_part(tokens: torch.Tensor) -> dict[str, Any]:
    t = tokens.detach().float().cpu().contiguous()
    data = base64.b64encode(t.numpy().astype("<f4").tobytes()).decode("ascii")
    shape = list(t.shape)
    return {"type": "visual_tokens", "visual_tokens": {"shape": shape, "dtype": "float32", "data": data}}  # fmt: skip


# -- chat ----------------------------------------------------------------------------------
@dataclass
class Answer:
    """What a request asks the engine for, besides its prompt."""

    config: GenerationConfig
    force_image: bool = False
    response_prefix: str | None = None
    # pixels for each image: DecodeConfig fields over the decoder's own sampling ({}: its
    # default); None: no pixels, visual tokens only
    decoding: dict[str, Any] | None = None
    return_tokens: bool = False


@dataclass
class ChatRequest:
    conversation: Conversation
    answer: Answer
    stream: bool = False
    include_usage: bool = False
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))


def check_model(body: dict, settings: ServeSettings) -> None:
    name = body.get("model")
    if name is not None and name != settings.model_name:
        raise ApiError(
            404,
            f"model '{name}' is not served here; this server serves '{settings.model_name}' "
            "(GET /v1/models)",
            "model",
        )


def parse_chat(body: Any, settings: ServeSettings, decoder: Any) -> ChatRequest:
    """A checked chat request; ``decoder``: the model's visual decoder, ``None`` when it has
    none."""
    _check_fields(body, CHAT_FIELDS, ACCEPTED_DEFAULTS, "chat completion request")
    check_model(body, settings)
    if body.get("n") not in (None, 1):
        raise _bad("'n' must be 1 (one answer per request); send several requests", "n")
    conversation = _conversation(body.get("messages"), settings)
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number({key: limit}, key, 1, settings.max_tokens, integer=True)
    temperature = _number(body, "temperature", 0.0, 2.0)
    sampling = dict(
        max_new_tokens=max_tokens or settings.default_max_tokens,
        do_sample=bool(temperature),
        temperature=float(temperature) if temperature else 1.0,
        top_p=float(_number(body, "top_p", 1e-6, 1.0) or 1.0),
        top_k=int(_number(body, "top_k", 0, 1_000_000, integer=True) or 0),
        seed=_number(body, "seed", -(2**62), 2**62, integer=True),
        stop=_stop(body.get("stop")),
    )
    answer = _answer(body.get("metamorph"), sampling, decoder, settings)
    if not isinstance(body.get("stream", False), bool):
        raise _bad("'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise _bad("'stream_options' may only hold 'include_usage'", "stream_options")
    return ChatRequest(
        conversation,
        answer,
        stream=bool(body.get("stream", False)),
        include_usage=bool(options.get("include_usage", False)),
    )


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or len(stops) > 4
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise _bad("'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    return tuple(stops)


def _answer(meta: Any, sampling: dict[str, Any], decoder: Any, settings: ServeSettings) -> Answer:
    has_decoder = decoder is not None
    meta = meta if meta is not None else {}
    if not isinstance(meta, dict):
        raise _bad("'metamorph' must be an object", "metamorph")
    unknown = sorted(set(meta) - META_FIELDS)
    if unknown:
        raise _bad(
            f"unknown field(s) {unknown} in 'metamorph'; it reads {sorted(META_FIELDS)}",
            "metamorph",
        )
    guidance = _number(meta, "visual_guidance_scale", 0.0, 100.0)
    for flag in ("image", "return_visual_tokens", "decode_images", "ignore_eos"):
        if not isinstance(meta.get(flag, False), bool):
            raise _bad(f"'metamorph.{flag}' must be true or false", f"metamorph.{flag}")
    prefix = meta.get("response_prefix")
    if prefix is not None and (not isinstance(prefix, str) or IMAGE_PLACEHOLDER in prefix):
        raise _bad(
            f"'metamorph.response_prefix' must be a string without '{IMAGE_PLACEHOLDER}'",
            "metamorph.response_prefix",
        )
    decode = meta.get("decode_images", has_decoder)
    if decode and not has_decoder:
        raise _bad(
            "this model has no visual decoder: it returns visual tokens only "
            "(metamorph.return_visual_tokens); leave decode_images out",
            "metamorph.decode_images",
        )
    decoding = _decoder_options(meta.get("decoder"), settings) if decode else None
    try:
        config = GenerationConfig(
            **sampling,
            visual_guidance_scale=float(guidance if guidance is not None else 1.0),
            ignore_eos=bool(meta.get("ignore_eos", False)),
        )
        if decoding:  # checked now, applied over the decoder's own sampling when it runs
            decoder.check_decoding(DecodeConfig.of(None, **decoding))
    except (ValueError, TypeError) as e:
        raise _bad(str(e), "metamorph") from e
    return Answer(
        config,
        force_image=bool(meta.get("image", False)),
        response_prefix=prefix,
        decoding=decoding,
        return_tokens=bool(meta.get("return_visual_tokens", False)),
    )


def _decoder_options(value: Any, settings: ServeSettings) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad("'metamorph.decoder' must be an object", "metamorph.decoder")
    known = {"scheduler", "steps", "guidance_scale", "seed"}
    unknown = sorted(set(value) - known)
    if unknown:
        raise _bad(f"unknown decoder option(s) {unknown}; use {sorted(known)}", "metamorph.decoder")
    scheduler = value.get("scheduler")
    if scheduler is not None and not (isinstance(scheduler, str) and scheduler):
        raise _bad("'scheduler' must be a scheduler's name", "metamorph.decoder.scheduler")
    options = {"scheduler": scheduler} if scheduler is not None else {}
    limits = {
        "steps": (1, settings.max_decoder_steps, True),
        "guidance_scale": (0.0, 100.0, False),
        "seed": (0, 2**63 - 1, True),
    }
    for key, (low, high, integer) in limits.items():
        try:
            number = _number(value, key, low, high, integer)
        except ApiError as e:
            message = e.message.replace(f"'{key}'", f"'metamorph.decoder.{key}'", 1)
            raise _bad(message, f"metamorph.decoder.{key}") from None
        if number is not None:
            options[key] = number
    return options


def _conversation(messages: Any, settings: ServeSettings) -> Conversation:
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages")
    turns, images = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad("each message must be an object with 'role' and 'content'", where)
        extra = sorted(set(message) - {"role", "content", "name"})
        if extra:
            raise _bad(f"unknown field(s) {extra} in a message", where)
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise _bad(f"role must be system, user or assistant, got {role!r}", f"{where}.role")
        text, found = _content(message.get("content"), settings, f"{where}.content")
        images += found
        turns.append(Turn(role, text))
    if turns[-1].role != "user":
        raise _bad("the last message must be the user's", f"messages[{len(messages) - 1}]")
    if len(images) > settings.max_images:
        raise ApiError(
            413,
            f"the request holds {len(images)} images, above the limit of "
            f"{settings.max_images} (--max-images)",
            "messages",
        )
    return Conversation(turns, images)


def _content(content: Any, settings: ServeSettings, where: str) -> tuple[str, list[Any]]:
    if isinstance(content, str):
        parts: list[Any] = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = content
    else:
        raise _bad("content must be a string or a list of parts", where)
    pieces, images = [], []
    for k, part in enumerate(parts):
        at = f"{where}[{k}]" if isinstance(content, list) else where
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if IMAGE_PLACEHOLDER in part["text"]:
                raise _bad(
                    f"text may not contain '{IMAGE_PLACEHOLDER}'; send images as image_url parts",
                    at,
                )
            pieces.append(part["text"])
        elif kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            images.append(load_image(url, settings, f"{at}.image_url"))
            pieces.append(IMAGE_PLACEHOLDER)
        else:
            raise _bad(
                "a content part must be {'type': 'text', 'text': ...} or {'type': 'image_url', "
                "'image_url': {'url': ...}}",
                at,
            )
    text = ""
    for piece in pieces:  # an image and the text around it are set apart by a newline
        joint = (
            "\n"
            if text and (piece == IMAGE_PLACEHOLDER or text.endswith(IMAGE_PLACEHOLDER))
            else ""
        )
        text += joint + piece
    return text, images


# -- images --------------------------------------------------------------------------------
@dataclass
class ImagesRequest:
    prompt: str
    n: int
    answer: Answer
    created: int = field(default_factory=lambda: int(time.time()))


def parse_images(body: Any, settings: ServeSettings, model: Any) -> ImagesRequest:
    _check_fields(body, IMAGES_FIELDS, IMAGES_DEFAULTS, "image generation request")
    check_model(body, settings)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _bad("'prompt' must be a non-empty string", "prompt")
    if IMAGE_PLACEHOLDER in prompt:
        raise _bad(f"'prompt' may not contain '{IMAGE_PLACEHOLDER}'", "prompt")
    n = _number(body, "n", 1, settings.max_n, integer=True) or 1
    if body.get("response_format", "b64_json") not in (None, "b64_json"):
        raise _bad(
            "'response_format' must be 'b64_json' (this server keeps no files)", "response_format"
        )
    if model.decoder is None:
        raise _bad(
            "this model has no visual decoder, so it makes no pixels; use /v1/chat/completions "
            "with metamorph.image and metamorph.return_visual_tokens for its visual tokens",
            "model",
        )
    size = body.get("size")
    h, w = model.decoder.image_size
    if size not in (None, "auto", f"{w}x{h}"):
        raise _bad(f"'size' must be '{w}x{h}' (the decoder's) or left out, got {size!r}", "size")
    meta = (
        dict(body.get("metamorph") or {})
        if isinstance(body.get("metamorph"), dict | type(None))
        else None
    )
    if meta is None:
        raise _bad("'metamorph' must be an object", "metamorph")
    meta.setdefault("image", True)
    meta["decode_images"] = True
    answer = _answer(meta, {"max_new_tokens": 1}, model.decoder, settings)
    answer.force_image = True
    return ImagesRequest(prompt, int(n), answer)
