"""The HTTP API (FastAPI): ``POST /v1/chat/completions`` (streaming as server-sent events),
``POST /v1/images/generations``, ``GET /v1/models``, ``GET /health`` and the chat page at
``/``. Requests are checked (:mod:`metamorph_serve.protocol`) and handed to the
:class:`~metamorph_serve.engine.Engine`, which batches them; a bad request gets a 4xx with a
message, a full queue a 429, and the server keeps serving whatever a client sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from metamorph_core.conversation import IMAGE_PLACEHOLDER, Conversation, Turn
from metamorph_core.errors import MetaMorphError
from metamorph_core.generation import (
    DoneEvent,
    ImageEvent,
    TextEvent,
    check_room,
    encode_prompts,
)
from metamorph_serve.engine import Engine, Failed, Job, QueueFull
from metamorph_serve.protocol import (
    Answer,
    ApiError,
    ChatRequest,
    parse_chat,
    parse_images,
    png_b64,
    png_data_url,
    tokens_part,
)
from metamorph_serve.settings import ServeSettings

STATIC = Path(__file__).with_name("static")
FINISH = {"stop": "stop", "image": "stop", "length": "length"}


def create_app(
    model: Any, settings: ServeSettings | None = None, log: Any = None, engine_thread: bool = True
) -> FastAPI:
    """The server's app for ``model`` (a :class:`~metamorph_core.MetaMorphModel` in eval mode
    on its device): an :class:`Engine` starts with it (in a thread of its own, or with
    ``engine_thread=False`` wherever the caller runs ``app.state.engine.run()``) and stops at
    shutdown."""
    settings = settings or ServeSettings()
    engine = Engine(
        model,
        settings.max_batch,
        settings.max_queue,
        settings.batch_wait_s,
        log,
        thread=engine_thread,
        continuous=settings.continuous_batching,
        cache_implementation=settings.cache_implementation,
        compile=settings.compile,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.close()  # waiting requests are answered 503; the running batch finishes

    app = FastAPI(
        title="MetaMorph", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    app.state.engine, app.state.settings, app.state.model = engine, settings, model

    @app.exception_handler(ApiError)
    async def refused(request: Request, error: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if error.status == 429 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            key.encode(), settings.api_key.encode()
        ):
            raise ApiError(
                401, "a valid API key is required: send 'Authorization: Bearer KEY'", None
            )

    async def read_json(request: Request) -> Any:
        limit = settings.max_request_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise ApiError(413, f"the body exceeds {limit} bytes (--max-request-mb)")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"the body exceeds {limit} bytes (--max-request-mb)")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON ({e})") from e

    async def encode(conversation: Conversation, answer: Answer) -> Any:
        prefix = answer.response_prefix
        if prefix is None:
            prefix = model.image_answer_prefix if answer.force_image else ""
        try:
            (prompt,) = await run_in_threadpool(
                encode_prompts, model, [conversation], prefix, answer.config, answer.force_image
            )
            check_room(model, [prompt], answer.force_image)  # not later, in a shared batch
        except (MetaMorphError, ValueError) as e:  # too long, images not matching the text
            raise ApiError(400, str(e), "messages") from e
        return prompt

    def submit(jobs: list[Job]) -> None:
        try:
            engine.submit(jobs)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry later") from e

    def job(prompt: Any, answer: Answer, decoding: dict[str, Any] | None) -> Job:
        return Job(
            prompt,
            answer.config,
            answer.force_image,
            decoding,
            deadline=time.monotonic() + settings.timeout_s,
            loop=asyncio.get_running_loop(),
            events=asyncio.Queue(),
        )

    # -- routes ------------------------------------------------------------------------------
    compute_dtype = _compute_dtype(model.backbone)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        s = engine.stats
        return {
            "status": "ok",
            "model": settings.model_name,
            "waiting": engine.waiting,
            "batches": s.batches,
            "requests": s.jobs,
            "joined": s.joined,
            "largest_batch": s.largest_batch,
            "continuous_batching": engine.continuous,
            "cache_implementation": engine.cache_implementation,
            "compile": engine.compile,
            "dtype": compute_dtype,
            "cancelled": s.cancelled,
            "timed_out": s.timed_out,
            "failures": s.failures,
        }

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        decoder = model.decoder
        return {
            "object": "list",
            "data": [
                {
                    "id": settings.model_name,
                    "object": "model",
                    "owned_by": "metamorph",
                    "created": 0,
                    "metamorph": {
                        "image_input": True,
                        "image_output": decoder is not None,
                        "image_size": list(decoder.image_size) if decoder is not None else None,
                        "visual_tokens": model.num_image_tokens,
                        "max_tokens": settings.max_tokens,
                    },
                }
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        authorize(request)
        chat = parse_chat(await read_json(request), settings, model.decoder)
        prompt = await encode(chat.conversation, chat.answer)
        task = job(prompt, chat.answer, chat.answer.decoding)
        submit([task])
        if chat.stream:
            return StreamingResponse(
                _stream(chat, task, len(prompt.sample.input_ids)),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        images, result = await _collect(request, task)
        if result is None:  # the client left
            return Response(status_code=499)
        content = _content(result.text, images, chat.answer.return_tokens)
        return JSONResponse(
            {
                "id": chat.id,
                "object": "chat.completion",
                "created": chat.created,
                "model": settings.model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": _finish(result, task),
                    }
                ],
                "usage": _usage(len(prompt.sample.input_ids), result, model),
            }
        )

    @app.post("/v1/images/generations")
    async def images(request: Request) -> Response:
        authorize(request)
        req = parse_images(await read_json(request), settings, model)
        conversation = Conversation([Turn("user", req.prompt)])
        prompt = await encode(conversation, req.answer)
        base = req.answer.decoding or {}
        tasks = []
        for k in range(req.n):  # one image each; a given decoder seed counts up per image
            decoding = dict(base)
            if decoding.get("seed") is not None:
                decoding["seed"] += k
            tasks.append(job(prompt, req.answer, decoding))
        submit(tasks)
        data = []
        for task in tasks:
            found, result = await _collect(request, task)
            if result is None:
                for t in tasks:
                    t.cancelled.set()
                return Response(status_code=499)
            if not found or found[0].image is None:
                raise ApiError(503, "the request timed out before its image was complete")
            item: dict[str, Any] = {"b64_json": png_b64(found[0].image), "revised_prompt": None}
            if req.answer.return_tokens:
                item["visual_tokens"] = tokens_part(found[0].tokens)["visual_tokens"]
            data.append(item)
        return JSONResponse({"created": req.created, "data": data})

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # -- helpers needing the engine --------------------------------------------------------
    async def _collect(request: Request, task: Job) -> tuple[list[ImageEvent], Any]:
        """Wait for ``task``'s events; ``(images, result)``, result ``None`` when the client
        left (the job is cancelled)."""
        found: list[ImageEvent] = []
        while True:
            try:
                event = await asyncio.wait_for(task.events.get(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    task.cancelled.set()
                    return found, None
                continue
            if isinstance(event, Failed):
                raise ApiError(event.status, event.message, kind="server_error")
            if isinstance(event, ImageEvent):
                found.append(event)
            elif isinstance(event, DoneEvent):
                return found, event.result

    async def _stream(chat: ChatRequest, task: Job, prompt_tokens: int) -> AsyncIterator[str]:
        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            body = {
                "id": chat.id,
                "object": "chat.completion.chunk",
                "created": chat.created,
                "model": settings.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return f"data: {json.dumps(body)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                event = await task.events.get()
                if isinstance(event, Failed):
                    error = ApiError(event.status, event.message, kind="server_error")
                    yield f"data: {json.dumps(error.body())}\n\n"
                    break
                if isinstance(event, TextEvent):
                    for piece in event.text.split(IMAGE_PLACEHOLDER):
                        if piece:
                            yield chunk({"content": piece})
                elif isinstance(event, ImageEvent):
                    parts = _image_parts(event, chat.answer.return_tokens)
                    if parts:
                        yield chunk({"content": parts})
                elif isinstance(event, DoneEvent):
                    yield chunk({}, _finish(event.result, task))
                    if chat.include_usage:
                        usage = _usage(prompt_tokens, event.result, model)
                        body = {"id": chat.id, "object": "chat.completion.chunk",
                                "created": chat.created, "model": settings.model_name,
                                "choices": [], "usage": usage}  # fmt: skip
                        yield f"data: {json.dumps(body)}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:  # finished, or the client went away: its row is freed at the next step
            task.cancelled.set()

    return app


def _image_parts(event: ImageEvent, return_tokens: bool) -> list[dict[str, Any]]:
    parts = []
    if event.image is not None:
        parts.append({"type": "image_url", "image_url": {"url": png_data_url(event.image)}})
    if return_tokens:
        parts.append(tokens_part(event.tokens))
    return parts


def _content(text: str, images: list[ImageEvent], return_tokens: bool) -> Any:
    """The answer as a string, or as parts when it holds images (text, image, text, ...)."""
    if not images:
        return text
    pieces = text.split(IMAGE_PLACEHOLDER)
    parts: list[dict[str, Any]] = []
    for k, piece in enumerate(pieces):
        if piece:
            parts.append({"type": "text", "text": piece})
        if k < len(images):
            parts += _image_parts(images[k], return_tokens)
    return parts


def _finish(result: Any, task: Job) -> str:
    if result.finish_reason == "cancelled":
        return "timeout" if task.timed_out else "cancelled"
    return FINISH.get(result.finish_reason, result.finish_reason)


def _compute_dtype(backbone: Any) -> str:
    """The LLM's compute dtype: its ``dtype`` (the input embeddings' for transformers
    backbones), else its first floating-point weight (a 4-bit base's packed weights are
    not); ``"unknown"`` when it has neither."""
    dtype = getattr(backbone, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        dtype = next((p.dtype for p in backbone.parameters() if p.is_floating_point()), None)
    return str(dtype).removeprefix("torch.") if dtype is not None else "unknown"


def _usage(prompt_tokens: int, result: Any, model: Any) -> dict[str, Any]:
    completion = len(result.token_ids)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "visual_tokens": len(result.images) * model.num_image_tokens,
    }
