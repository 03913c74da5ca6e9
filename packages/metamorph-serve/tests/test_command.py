"""``metamorph serve`` as a user starts it: a process serving a saved checkpoint (generation in
its main thread, HTTP in another), stopped cleanly by SIGTERM; a taken port is an error."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from metamorph_core.testing import free_port
from metamorph_core.testing.trained import BLUE


def _metamorph() -> list[str]:
    script = Path(sys.executable).with_name("metamorph")
    return [str(script)] if script.exists() else [sys.executable, "-m", "metamorph_core.cli"]


def _serve(checkpoint: Path, *options: str) -> tuple[subprocess.Popen, str, dict]:
    """``metamorph serve CHECKPOINT OPTIONS`` started; its process, URL and first /health."""
    port = free_port()
    argv = [*_metamorph(), "serve", str(checkpoint), "--port", str(port), "--device", "cpu"]
    process = subprocess.Popen(
        [*argv, *options], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                health = httpx.get(url + "/health", timeout=1).json()
                if health["status"] == "ok":
                    return process, url, health
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "metamorph serve did not start"
            time.sleep(0.2)
    except BaseException:
        process.kill()
        process.communicate(timeout=60)
        raise


def test_serve_answers_and_stops_on_sigterm(model, tmp_path):
    checkpoint = model.save_pretrained(tmp_path / "tiny")
    process, url, health = _serve(checkpoint)
    try:
        assert health["dtype"] == "float32"  # as saved
        body = {"messages": [{"role": "user", "content": BLUE}], "max_tokens": 40,
                "metamorph": {"decode_images": False}}  # fmt: skip
        answer = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
        (want,) = model.generate(BLUE, max_new_tokens=40)
        parts = answer["choices"][0]["message"]["content"]
        assert "".join(p["text"] for p in parts if p["type"] == "text") == want.text.replace(
            "<image>", ""
        )
        assert answer["model"] == "tiny"  # the directory's name
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "serving 'tiny' (with a visual decoder) on http://127.0.0.1:" in output


def test_serve_in_bfloat16(model, tmp_path):
    """``--dtype bfloat16`` loads the LLM in bf16 (the faster batched configuration on CPUs
    with bf16 units, BENCHMARKS.md "Serving") and it answers."""
    checkpoint = model.save_pretrained(tmp_path / "tiny")
    process, url, health = _serve(checkpoint, "--dtype", "bfloat16")
    try:
        assert health["dtype"] == "bfloat16"
        body = {"messages": [{"role": "user", "content": BLUE}], "max_tokens": 8,
                "metamorph": {"decode_images": False}}  # fmt: skip
        answer = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] > 0
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output


def test_a_taken_port_is_an_error(model, tmp_path):
    checkpoint = model.save_pretrained(tmp_path / "tiny")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = [*_metamorph(), "serve", str(checkpoint), "--port", str(port), "--device", "cpu"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "address already in use" in (done.stdout + done.stderr).lower()
