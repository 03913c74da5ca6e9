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


def test_serve_answers_and_stops_on_sigterm(model, tmp_path):
    checkpoint = model.save_pretrained(tmp_path / "tiny")
    port = free_port()
    argv = [*_metamorph(), "serve", str(checkpoint), "--port", str(port), "--device", "cpu"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).json()["status"] == "ok":
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "metamorph serve did not start"
                time.sleep(0.2)
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
