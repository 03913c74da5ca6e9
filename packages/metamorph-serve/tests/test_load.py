"""A short load test on a real server (uvicorn on a port, clients in threads): concurrent
requests are generated together, bad requests get their 4xx while good ones in flight
complete, a client that leaves frees its row, and a request past its time ends with what it
has. Throughput and latency are measured by benchmarks/bench_serve.py, not here."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from metamorph_core.testing.trained import AGAIN, BLUE, RED

CHAT = "/v1/chat/completions"
PROMPTS = [RED, BLUE, AGAIN, "a red circle", "a blue square", "hello", "what is this?", "again"]


def _body(text, **extra):
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 12,
            "metamorph": {"decode_images": False, "return_visual_tokens": True}, **extra}  # fmt: skip


def _image_message(url):
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}


def _text(response):
    """The answer's text with ``<image>`` where each image is (its visual tokens part)."""
    content = response.json()["choices"][0]["message"]["content"]
    if isinstance(content, str):
        return content
    return "".join(p["text"] if p["type"] == "text" else "<image>" for p in content)


def _delta(line):
    (choice,) = json.loads(line[len("data: ") :])["choices"]
    return choice["delta"].get("content")


@pytest.fixture
def slow(model, monkeypatch):
    """The model, each decoding step made 20 ms slower (its vocabulary projection sleeps), so
    that a request is still running when the test acts on it."""
    logits = model.backbone.logits

    def slowed(hidden):
        time.sleep(0.02)
        return logits(hidden)

    monkeypatch.setattr(model.backbone, "logits", slowed)
    return model


def test_concurrent_requests_share_batches_and_bad_ones_do_not_disturb_them(live, model):
    url = live(max_batch=8, batch_wait_s=0.3)
    bad = [
        (b"{not json", 400),
        (json.dumps(_body(RED, bogus=1)).encode(), 400),
        (json.dumps({"messages": [_image_message("data:image/png;base64,!!!")]}).encode(), 400),
        (json.dumps(_body(RED, max_tokens=10**6)).encode(), 400),
    ]
    with httpx.Client(base_url=url, timeout=120) as client:

        def good(text):
            return client.post(CHAT, json=_body(text))

        def refused(item):
            content, _ = item
            headers = {"content-type": "application/json"}
            return client.post(CHAT, content=content, headers=headers)

        with ThreadPoolExecutor(len(PROMPTS) + len(bad)) as pool:
            answers = pool.map(good, PROMPTS)
            refusals = pool.map(refused, bad)
            answers, refusals = list(answers), list(refusals)
        health = client.get("/health").json()

    assert [r.status_code for r in refusals] == [status for _, status in bad]
    assert all("message" in r.json()["error"] for r in refusals)
    assert [r.status_code for r in answers] == [200] * len(PROMPTS)
    # batching changes nothing in a greedy answer: each is what the model says alone
    for text, response in zip(PROMPTS, answers, strict=True):
        (want,) = model.generate(text, max_new_tokens=12)
        assert _text(response) == want.text
    assert health["requests"] == len(PROMPTS)
    assert health["largest_batch"] > 1  # requests shared forward passes
    assert health["batches"] < len(PROMPTS)
    assert health["failures"] == 0


def test_a_client_that_leaves_frees_its_row_and_the_others_finish(live, slow):
    url = live(max_batch=8, batch_wait_s=0.2)
    long = _body(RED, max_tokens=400, stream=True)
    short = _body(BLUE, max_tokens=30)
    for body in (long, short):  # the same options: one batch
        body["metamorph"]["ignore_eos"] = True
    with httpx.Client(base_url=url, timeout=120) as client, ThreadPoolExecutor(2) as pool:
        stays = pool.submit(client.post, CHAT, json=short)
        with client.stream("POST", CHAT, json=long) as response:
            assert response.status_code == 200
            for line in response.iter_lines():  # until the first text: its batch runs
                if line.startswith("data: {") and _delta(line):
                    break
        # the connection is closed: the server notices and stops the row at its next step
        deadline = time.monotonic() + 20
        while client.get("/health").json()["cancelled"] < 1:
            assert time.monotonic() < deadline, "the departed client's row was not freed"
            time.sleep(0.05)
        stayed = stays.result()
        health = client.get("/health").json()
    assert stayed.status_code == 200
    assert stayed.json()["choices"][0]["finish_reason"] == "length"  # all it asked for
    assert health["largest_batch"] == 2  # the two ran together
    assert health["cancelled"] == 1 and health["failures"] == 0


def test_a_request_past_its_time_ends_with_what_it_has(live, slow):
    url = live(timeout_s=0.5)
    body = _body(RED, max_tokens=400)
    body["metamorph"]["ignore_eos"] = True
    with httpx.Client(base_url=url, timeout=60) as client:
        started = time.monotonic()
        response = client.post(CHAT, json=body)
        took = time.monotonic() - started
        health = client.get("/health").json()
    assert response.status_code == 200
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "timeout"
    assert 0 < response.json()["usage"]["completion_tokens"] < 400
    assert took < 5  # 400 steps of 20 ms would take 8 s
    assert health["timed_out"] == 1


def test_a_request_arriving_mid_batch_joins_it_at_the_next_step(live, slow, model):
    url = live(max_batch=8, batch_wait_s=0.0)
    long = _body(RED, max_tokens=200, stream=True)
    late = _body(BLUE, max_tokens=20)
    for body in (long, late):  # the same options: it may join
        body["metamorph"]["ignore_eos"] = True
    with (
        httpx.Client(base_url=url, timeout=120) as client,
        client.stream("POST", CHAT, json=long) as response,
    ):
        lines = response.iter_lines()
        for line in lines:  # the long request is generating
            if line.startswith("data: {") and _delta(line):
                break
        answer = client.post(CHAT, json=late)
        health = client.get("/health").json()
        assert health["batches"] == 1  # still the first batch: the late one joined it
        for _ in lines:  # the long one goes on to its end
            pass
    assert health["joined"] == 1 and health["largest_batch"] == 2
    (want,) = model.generate(BLUE, max_new_tokens=20, ignore_eos=True)
    assert _text(answer) == want.text  # as if alone
