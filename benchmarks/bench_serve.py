"""Serving (issue #23): ``metamorph serve`` in its own process on the CPU mid-size model (the
random-weight Llama-style backbone of ``bench_generation.py``: hidden 512, 8 layers,
vocabulary 32000, 64 visual tokens of width 1152; a tiny pixel-space sd-unet decoder
attached for image answers), driven over HTTP by client threads in this process.

- **Throughput**: the same 8 chat requests (distinct 40-word prompts of about 130 tokens, 64 new tokens each,
  greedy, ``metamorph.ignore_eos``, streamed) sent one after another vs all at once, rounds
  interleaved; aggregate text tokens/s (target: concurrent >= 4x sequential), per-request
  latency p50/p95 and time to first token (first text delta) p50/p95 for both.
- **Arrivals spread out**: the same 8 requests sent 0.25 s apart, to a server with continuous
  batching (a request joins the running batch at the next step) and to one with
  ``--no-continuous-batching`` (it waits for the next batch); wall time and per-request latency.
- **Soak** (``--soak-s``, default 600): client threads send a mix for that long (text, an
  input image, an image answer decoded to pixels, streaming, streams the client abandons, and
  bad requests: invalid JSON, unknown fields, bad base64, an oversized ``max_tokens``); counts
  every status, and samples the server's resident memory (``VmRSS``) every 5 s. Targets: no
  5xx, every good request answered 200 (every bad one 4xx), and resident memory after the
  first minute grows by at most ``RSS_BOUND_MIB``.

    .venv/bin/python benchmarks/bench_serve.py [--repeats 3] [--soak-s 600] [--dtype bfloat16] [--smoke]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import workloads as W
from bench_generation import build_model
from harness import OWN_PIDS, Case, Suite, add_common_arguments, command_line, results_dir
from PIL import Image

from metamorph_core.testing import build_tiny_tokenizer, free_port

CHAT = "/v1/chat/completions"
CLIENTS = 8
NEW_TOKENS = 64
STAGGER_S = 0.25
PROMPT_WORDS = 40  # about 130 tokens with the chat template, as bench_generation's prompts
SOAK_CLIENTS = 6
RSS_BOUND_MIB = 64.0  # growth allowed after the first minute (allocator pools settle)
WORDS = ["red", "blue", "green", "square", "circle", "image", "the", "a", "of", "is", "what",
         "where", "left", "right", "big", "small"]  # fmt: skip


def save_checkpoint(tmp: Path, smoke: bool) -> Path:
    """The mid-size model (tiny under ``--smoke``) with a tiny pixel-space decoder, saved."""
    from metamorph_decoders.testing import tiny_decoder

    backbone = {"model_type": "llama", **(W.TINY_BACKBONE if smoke else W.MID_BACKBONE)}
    # a token for (almost) every row of the vocabulary, so that what random weights choose is
    # text that streams (the tiny tokenizer's 320 tokens would leave most ids unprintable)
    tokenizer = build_tiny_tokenizer("llama")
    tokenizer.add_tokens([f"<w{i}>" for i in range(backbone["vocab_size"] - len(tokenizer) - 80)])
    model = build_model(tmp, "cpu", backbone, tokenizer)
    sampling = {"scheduler": "ddim", "steps": 4, "guidance_scale": 1.0, "seed": 0}
    decoder = tiny_decoder(model, adapter=None, sampling=sampling)  # the default adapter
    model.attach_decoder(decoder.eval())
    return model.save_pretrained(tmp / "checkpoint")


class Server:
    """``metamorph serve CHECKPOINT`` in a process of its own."""

    def __init__(self, checkpoint: Path, log: Path, *options: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        script = Path(sys.executable).with_name("metamorph")
        argv = [str(script), "serve", str(checkpoint), "--port", str(self.port)]
        argv += ["--max-batch", str(CLIENTS), "--max-tokens", "256", *options]
        self.log = log.open("w")
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        OWN_PIDS.add(self.process.pid)  # its work is the benchmark's, not other load
        deadline = time.monotonic() + 300
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"metamorph serve exited ({self.process.returncode}); see {log}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"metamorph serve did not start in 300 s; see {log}")
            time.sleep(0.2)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        OWN_PIDS.discard(self.process.pid)
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()


def prompt(k: int) -> str:
    rng = random.Random(k)
    return " ".join(rng.choice(WORDS) for _ in range(PROMPT_WORDS))


def chat_body(text: str, tokens: int = NEW_TOKENS, **extra) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": tokens,
            "metamorph": {"ignore_eos": True, "decode_images": False}, **extra}  # fmt: skip


def streamed(client: httpx.Client, body: dict) -> tuple[float, float, int]:
    """Send a streaming chat request: (seconds to the first text, seconds in all, tokens)."""
    started, first, tokens = time.perf_counter(), None, None
    with client.stream("POST", CHAT, json={**body, "stream": True,
                       "stream_options": {"include_usage": True}}) as response:  # fmt: skip
        if response.status_code != 200:
            raise SystemExit(f"a benchmark request failed: {response.status_code}")
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[len("data: ") :])
            if "error" in event:
                raise SystemExit(f"a benchmark request failed: {event['error']}")
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif first is None and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - started
    return first or float("nan"), time.perf_counter() - started, tokens or 0


def answered(client: httpx.Client, body: dict) -> tuple[float, float, int]:
    """Send a chat request and wait for the whole answer: (nan, seconds, tokens)."""
    started = time.perf_counter()
    response = client.post(CHAT, json=body)
    if response.status_code != 200:
        raise SystemExit(f"a benchmark request failed: {response.status_code} {response.text}")
    seconds = time.perf_counter() - started
    return float("nan"), seconds, response.json()["usage"]["completion_tokens"]


class Rounds:
    """The 8 requests sent one after another or all at once, streamed (``stream``) or not;
    latencies kept per mode."""

    def __init__(self, url: str, stream: bool) -> None:
        self.client = httpx.Client(base_url=url, timeout=600)
        self.send = streamed if stream else answered
        self.bodies = [chat_body(prompt(k)) for k in range(CLIENTS)]
        self.kept: dict[str, list[tuple[float, float, int]]] = {"sequential": [], "concurrent": []}

    def sequential(self) -> None:
        self._keep("sequential", [self.send(self.client, b) for b in self.bodies])

    def concurrent(self) -> None:
        out: list = [None] * CLIENTS
        go = threading.Barrier(CLIENTS)

        def one(k: int) -> None:
            go.wait()
            out[k] = self.send(self.client, self.bodies[k])

        threads = [threading.Thread(target=one, args=(k,)) for k in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._keep("concurrent", out)

    def _keep(self, mode: str, runs: list) -> None:
        tokens = sum(r[2] for r in runs)
        if tokens != CLIENTS * NEW_TOKENS:
            raise SystemExit(f"{mode}: {tokens} tokens came back, not {CLIENTS * NEW_TOKENS}")
        self.kept[mode] += runs


class Staggered:
    """The 8 requests sent ``STAGGER_S`` apart (streamed): what continuous batching is for."""

    def __init__(self, url: str) -> None:
        self.url, self.kept = url, []
        self.bodies = [chat_body(prompt(k)) for k in range(CLIENTS)]

    def __call__(self) -> None:
        out: list = [None] * CLIENTS

        def one(k: int) -> None:
            with httpx.Client(base_url=self.url, timeout=600) as client:
                out[k] = streamed(client, self.bodies[k])

        threads = []
        for k in range(CLIENTS):
            threads.append(threading.Thread(target=one, args=(k,)))
            threads[-1].start()
            time.sleep(STAGGER_S)
        for t in threads:
            t.join()
        self.kept += out


def per_request(suite: Suite, name: str, runs: list, config: dict) -> None:
    latency, ttft = percentiles([r[1] for r in runs]), percentiles([r[0] for r in runs])
    figures = {"latency p50 s": latency[0], "latency p95 s": latency[1]}
    if not any(np.isnan(r[0]) for r in runs):
        figures |= {"first token p50 s": ttft[0], "first token p95 s": ttft[1]}
    suite.record(name, figures, {"requests": len(runs), **config})


def percentiles(values: list[float]) -> tuple[float, float]:
    return float(np.percentile(values, 50)), float(np.percentile(values, 95))


# -- the soak ------------------------------------------------------------------------------------
def png_data_url(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_message(url: str, text: str) -> dict:
    image = {"type": "image_url", "image_url": {"url": url}}
    return {"role": "user", "content": [image, {"type": "text", "text": text}]}


def soak_request(client: httpx.Client, kind: str, rng: random.Random) -> int:
    """Send one request of ``kind``; its status (an abandoned stream: 200 once it started)."""
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40)))
    tokens = rng.randint(4, 48)
    if kind == "text":
        return client.post(CHAT, json=chat_body(text, tokens)).status_code
    if kind == "image-in":
        body = chat_body("", tokens)
        body["messages"] = [image_message(png_data_url(rng.randint(0, 99)), text)]
        return client.post(CHAT, json=body).status_code
    if kind == "image-out":
        body = {"prompt": text, "metamorph": {"decoder": {"steps": 4, "seed": rng.randint(0, 9)}}}
        response = client.post("/v1/images/generations", json=body)
        if response.status_code == 200 and not response.json()["data"][0]["b64_json"]:
            return 599  # counted as a failure: an answer without its image
        return response.status_code
    if kind == "stream":
        try:
            _, _, got = streamed(client, chat_body(text, tokens))
        except SystemExit:
            return 598
        return 200 if got == tokens else 597
    if kind == "cancel":
        with client.stream("POST", CHAT, json={**chat_body(text, 200), "stream": True}) as r:
            status = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get(
                    "content"
                ):
                    break  # leave after the first text
        return status
    bad = {
        "bad-json": (b'{"messages": [', None),
        "bad-field": (None, {**chat_body(text, tokens), "temperatur": 0.5}),
        "bad-base64": (None, {"messages": [image_message("data:image/png;base64,@@@", text)]}),
        "bad-tokens": (None, chat_body(text, 10**7)),
    }[kind]
    if bad[0] is not None:
        headers = {"content-type": "application/json"}
        return client.post(CHAT, content=bad[0], headers=headers).status_code
    return client.post(CHAT, json=bad[1]).status_code


GOOD = ["text", "image-in", "image-out", "stream", "cancel"]
BAD = ["bad-json", "bad-field", "bad-base64", "bad-tokens"]


def soak(server: Server, seconds: float, suite: Suite) -> None:
    statuses: dict[str, Counter] = {k: Counter() for k in GOOD + BAD}
    errors: list[str] = []
    rss: list[tuple[float, float]] = []
    stop = time.monotonic() + seconds
    started = time.monotonic()

    def client_loop(k: int) -> None:
        rng = random.Random(1000 + k)
        with httpx.Client(base_url=server.url, timeout=300) as client:
            while time.monotonic() < stop:
                kind = rng.choice(GOOD * 3 + BAD)  # three good requests to each bad one
                try:
                    statuses[kind][soak_request(client, kind, rng)] += 1
                except httpx.HTTPError as e:
                    errors.append(f"{kind}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(SOAK_CLIENTS)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        rss.append((time.monotonic() - started, server.rss_mib()))
        time.sleep(5)
    rss.append((time.monotonic() - started, server.rss_mib()))
    health = httpx.get(server.url + "/health").json()

    good = sum(sum(statuses[k].values()) for k in GOOD)
    good_ok = sum(statuses[k][200] for k in GOOD)
    bad = sum(sum(statuses[k].values()) for k in BAD)
    bad_4xx = sum(n for k in BAD for s, n in statuses[k].items() if 400 <= s < 500)
    fives = sum(n for c in statuses.values() for s, n in c.items() if s >= 500)
    settle = next((m for t, m in rss if t >= min(60.0, seconds / 4)), rss[0][1])
    growth = rss[-1][1] - settle
    for kind in GOOD + BAD:
        shown = ", ".join(f"{s}: {n}" for s, n in sorted(statuses[kind].items()))
        suite.note(f"soak {kind}: {shown or 'none sent'}")
    suite.record(
        "soak",
        {
            "seconds": seconds,
            "good requests": good,
            "good answered 200": good_ok,
            "bad requests": bad,
            "bad answered 4xx": bad_4xx,
            "5xx": fives,
            "client errors": len(errors),
            "RSS start MiB": rss[0][1],
            "RSS settled MiB": settle,
            "RSS end MiB": rss[-1][1],
            "RSS max MiB": max(m for _, m in rss),
            "batches": health["batches"],
            "largest batch": health["largest_batch"],
            "cancelled": health["cancelled"],
        },
        {"clients": SOAK_CLIENTS},
    )
    for line in errors[:5]:
        suite.note(f"soak client error: {line}")
    suite.target("soak: no 5xx", fives == 0 and not errors, f"{fives} 5xx, {len(errors)} errors")
    suite.target("soak: every good request answered", good_ok == good, f"{good_ok}/{good}")
    suite.target("soak: every bad request 4xx", bad_4xx == bad, f"{bad_4xx}/{bad}")
    suite.target(
        f"soak: resident memory grows <= {RSS_BOUND_MIB:.0f} MiB after the first minute",
        growth <= RSS_BOUND_MIB,
        f"{settle:.0f} -> {rss[-1][1]:.0f} MiB ({growth:+.1f} MiB; max {max(m for _, m in rss):.0f})",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--soak-s", type=float, default=600.0, help="soak length; 0: none")
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="passed to metamorph serve: the LLM's dtype (default: as saved, float32)",
    )
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.soak_s = 1, min(args.soak_s, 3.0)
    name = f"serve-{args.dtype}" if args.dtype else "serve"  # results/<name>.md
    suite = Suite(name, command_line("bench_serve.py"), wait=not args.no_wait)
    with tempfile.TemporaryDirectory(prefix="metamorph-bench-serve-") as tmp:
        checkpoint = save_checkpoint(Path(tmp), args.smoke)
        dtype = ("--dtype", args.dtype) if args.dtype else ()
        server = Server(checkpoint, Path(tmp) / "server.log", *dtype)
        try:
            served = httpx.get(server.url + "/health").json()["dtype"]
            suite.note(f"server's LLM dtype (its /health): {served}")
            rounds = Rounds(server.url, stream=args.stream)
            tokens = {"text tokens": CLIENTS * NEW_TOKENS}
            seq, conc = suite.measure(
                Case("8 requests one after another", rounds.sequential, counts=tokens),
                Case("8 requests at once", rounds.concurrent, counts=tokens),
                repeats=args.repeats,
            )
            for mode, runs in rounds.kept.items():
                runs = runs[len(runs) // (args.repeats + 1) :]  # not the warm-up round
                per_request(suite, f"{mode}: per request", runs, {})
            health = httpx.get(server.url + "/health").json()
            suite.note(
                f"engine: {health['batches']} batches for {health['requests']} requests, "
                f"largest {health['largest_batch']}"
            )
            suite.target(
                "8 concurrent clients >= 4x the tokens/s of the same 8 one after another",
                conc.speedup >= 4.0,
                f"{conc.speedup:.2f}x ({seq.figures['text tokens/s']:.0f} -> "
                f"{conc.figures['text tokens/s']:.0f} text tokens/s)",
            )
            # arrivals spread out: joining at the next step vs waiting for the next batch
            boundary = Server(
                checkpoint, Path(tmp) / "boundary.log", "--no-continuous-batching", *dtype
            )
            try:
                joining, waiting = Staggered(server.url), Staggered(boundary.url)
                suite.measure(
                    Case(f"8 requests {STAGGER_S} s apart, at batch boundaries", waiting,
                         counts=tokens),
                    Case(f"8 requests {STAGGER_S} s apart, continuous batching", joining,
                         counts=tokens),
                    repeats=args.repeats,
                )  # fmt: skip
                for name, runs in (("boundaries", waiting.kept), ("continuous", joining.kept)):
                    runs = runs[len(runs) // (args.repeats + 1) :]
                    per_request(suite, f"{STAGGER_S} s apart, {name}: per request", runs, {})
                joined = httpx.get(server.url + "/health").json()["joined"]
                suite.note(f"continuous batching: {joined} requests joined a running batch")
            finally:
                boundary.stop()
            if args.soak_s > 0:
                rss = server.rss_mib()
                print(f"soak for {args.soak_s:.0f} s from {rss:.0f} MiB resident", flush=True)
                soak(server, args.soak_s, suite)
        finally:
            server.stop()
            if server.process.returncode not in (0, -15):
                print((Path(tmp) / "server.log").read_text()[-4000:], file=sys.stderr)
    suite.write(results_dir(args))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
