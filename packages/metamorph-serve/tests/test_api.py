"""The HTTP API on the tiny trained model with a tiny decoder: answers equal the library's,
streaming, images out and in, the OpenAI client, and bad input refused with a 4xx naming it."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from metamorph_core.generation import GenerationConfig
from metamorph_core.testing.trained import AGAIN, BLUE, RED

CHAT = "/v1/chat/completions"


def _data_url(rgb=(230, 20, 20), size=(16, 16), fmt="PNG"):
    buffer = io.BytesIO()
    Image.fromarray(np.full((*size, 3), rgb, np.uint8)).save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def _user(text, *images):
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def _png(url_or_b64):
    raw = base64.b64decode(url_or_b64.split(",", 1)[-1])
    return Image.open(io.BytesIO(raw))


def _events(response):
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_health_models_and_the_api_key(serve):
    client = serve(api_key="sesame", model_name="tiny")
    assert client.get("/health").json()["status"] == "ok"  # no key needed
    refused = client.get("/v1/models")
    assert refused.status_code == 401 and "Bearer" in refused.json()["error"]["message"]
    wrong = client.post(CHAT, headers={"Authorization": "Bearer nope"}, json={})
    assert wrong.status_code == 401
    models = client.get("/v1/models", headers={"Authorization": "Bearer sesame"}).json()
    (entry,) = models["data"]
    assert entry["id"] == "tiny" and entry["metamorph"]["image_output"] is True
    assert client.get("/").status_code == 200  # the page itself holds no data


def test_a_chat_answer_is_the_models_own_with_its_image(serve, model):
    client = serve()
    body = {"model": "metamorph", "messages": [_user(BLUE)], "max_tokens": 40}
    answer = client.post(CHAT, json=body).json()
    (want,) = model.generate(BLUE, max_new_tokens=40)
    parts = answer["choices"][0]["message"]["content"]
    texts = [p["text"] for p in parts if p["type"] == "text"]
    assert "<image>".join(texts) == want.text  # text around the image, in order
    (image,) = [p for p in parts if p["type"] == "image_url"]
    assert _png(image["image_url"]["url"]).size == tuple(model.decoder.image_size)[::-1]
    assert answer["choices"][0]["finish_reason"] == "stop"
    usage = answer["usage"]
    assert usage["completion_tokens"] == len(want.token_ids)
    assert usage["visual_tokens"] == model.num_image_tokens
    # visual tokens on request: exactly the library's
    body["metamorph"] = {"return_visual_tokens": True, "decode_images": False}
    parts = client.post(CHAT, json=body).json()["choices"][0]["message"]["content"]
    (tokens,) = [p["visual_tokens"] for p in parts if p["type"] == "visual_tokens"]
    got = np.frombuffer(base64.b64decode(tokens["data"]), "<f4").reshape(tokens["shape"])
    assert torch.allclose(torch.from_numpy(got.copy()), want.images[0], atol=1e-5)
    assert not [p for p in parts if p["type"] == "image_url"]


def test_an_input_image_is_read(serve, model):
    client = serve()
    red = _data_url((230, 25, 25))
    body = {"messages": [_user(AGAIN, red)], "max_tokens": 8, "metamorph": {"image": True,
            "response_prefix": "", "return_visual_tokens": True, "decode_images": False}}  # fmt: skip
    parts = client.post(CHAT, json=body).json()["choices"][0]["message"]["content"]
    (tokens,) = [p["visual_tokens"] for p in parts if p["type"] == "visual_tokens"]
    pixels = torch.from_numpy(np.asarray(_png(red)).copy()).permute(2, 0, 1).float() / 255
    (want,) = model.generate_image(f"<image>\n{AGAIN}", [pixels], response_prefix="")
    got = np.frombuffer(base64.b64decode(tokens["data"]), "<f4").reshape(tokens["shape"])
    assert torch.allclose(torch.from_numpy(got.copy()), want.images[0], atol=1e-4)


def test_streaming_sends_text_as_it_decodes_and_the_image_when_complete(serve, model):
    client = serve()
    body = {"messages": [_user(BLUE)], "max_tokens": 40, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with client.stream("POST", CHAT, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _events(response)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    deltas = [c["choices"][0]["delta"].get("content") for c in chunks]
    text_deltas = [d for d in deltas if isinstance(d, str) and d]
    image_deltas = [d for d in deltas if isinstance(d, list)]
    (want,) = model.generate(BLUE, max_new_tokens=40)
    assert "".join(text_deltas) == want.text.replace("<image>", "")
    assert len(text_deltas) > 2  # piece by piece, not at once
    assert len(image_deltas) == 1 and image_deltas[0][0]["type"] == "image_url"
    where = deltas.index(image_deltas[0])  # the image between its surrounding text
    assert "".join(d for d in deltas[:where] if isinstance(d, str)) == want.text.split("<image>")[0]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert events[-2]["usage"]["completion_tokens"] == len(want.token_ids)


def test_image_generation_gives_seeded_pngs(serve, model):
    client = serve()
    body = {"prompt": RED, "n": 2, "metamorph": {"decoder": {"steps": 2, "seed": 7}}}
    first = client.post("/v1/images/generations", json=body).json()["data"]
    again = client.post("/v1/images/generations", json=body).json()["data"]
    assert [d["b64_json"] for d in first] == [d["b64_json"] for d in again]
    assert first[0]["b64_json"] != first[1]["b64_json"]  # seeds 7 and 8
    size = tuple(model.decoder.image_size)[::-1]
    assert all(_png(d["b64_json"]).size == size for d in first)
    # what the library draws with the same tokens and decoder seed
    (result,) = model.generate_image(RED)
    pixels = model.decode_images(result.images[0][None], None, steps=2, seed=7)[0]
    want = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(_png(first[0]["b64_json"])), want)


def test_the_openai_client_talks_to_it(serve, model):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(
        base_url="http://testserver/v1", api_key="sesame", http_client=serve(api_key="sesame")
    )
    reply = client.chat.completions.create(
        model="metamorph", messages=[{"role": "user", "content": "two plus three"}], max_tokens=20
    )
    (want,) = model.generate("two plus three", max_new_tokens=20)
    assert reply.choices[0].message.content == want.text
    stream = client.chat.completions.create(
        model="metamorph",
        messages=[{"role": "user", "content": "two plus three"}],
        max_tokens=20,
        stream=True,
    )
    pieces = [
        c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content
    ]
    assert "".join(pieces) == want.text
    images = client.images.generate(model="metamorph", prompt=RED, n=1)
    assert _png(images.data[0].b64_json).size == tuple(model.decoder.image_size)[::-1]


@pytest.mark.parametrize(
    ("body", "status", "match"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        ({"messages": [_user("hi")], "tools": []}, 400, "'tools'"),
        ({"messages": [_user("hi")], "temprature": 0.5}, 400, "unknown field 'temprature'"),
        ({"messages": []}, 400, "non-empty list"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "last message"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "role must be"),
        ({"messages": [_user("<image> hi")]}, 400, "may not contain '<image>'"),
        ({"messages": [_user("hi")], "max_tokens": 10**6}, 400, "'max_tokens' must be"),
        ({"messages": [_user("hi")], "temperature": "hot"}, 400, "'temperature' must be"),
        ({"messages": [_user("hi")], "n": 2}, 400, "'n' must be 1"),
        ({"messages": [_user("hi")], "model": "gpt-9"}, 404, "not served here"),
        ({"messages": [_user("hi", "data:image/png;base64,@@@")]}, 400, "base64"),
        ({"messages": [_user("hi", "data:image/png;base64,aGVsbG8=")]}, 400, "cannot be read"),
        ({"messages": [_user("hi", "https://example.com/a.png")]}, 400, "remote URLs"),
        ({"messages": [_user("hi", "/etc/passwd")]}, 400, "local files are not read"),
        ({"messages": [_user("hi", _data_url(size=(80, 80)))]}, 413, "pixels"),
        ({"messages": [_user("hi", *[_data_url()] * 3)]}, 413, "max-images"),
        ({"messages": [_user("hi")], "metamorph": {"colour": 1}}, 400, "'metamorph'"),
        ({"messages": [_user("hi")], "metamorph": {"decoder": {"steps": 0}}}, 400, "steps"),
        (
            {"messages": [_user("hi")], "metamorph": {"decoder": {"steps": 10**4}}},
            400,
            "'metamorph.decoder.steps' must be an integer in [1, 250]",
        ),
        (
            {"messages": [_user("hi")], "metamorph": {"decoder": {"seed": 2**70}}},
            400,
            "'metamorph.decoder.seed' must be an integer",
        ),
        (
            {"messages": [_user("hi")], "metamorph": {"decoder": {"guidance_scale": "x"}}},
            400,
            "'metamorph.decoder.guidance_scale' must be a number",
        ),
        (
            {"messages": [_user("hi")], "metamorph": {"decoder": {"scheduler": "nope"}}},
            400,
            "unknown scheduler 'nope'",
        ),
        ({"messages": [_user("hi")], "metamorph": {"ignore_eos": 1}}, 400, "ignore_eos"),
        ({"messages": [_user("hi")], "stream": "yes"}, 400, "'stream'"),
    ],
)
def test_bad_requests_get_a_4xx_naming_the_problem(serve, body, status, match):
    client = serve(max_image_pixels=4000, max_images=2)
    if isinstance(body, bytes):
        response = client.post(CHAT, content=body, headers={"content-type": "application/json"})
    else:
        response = client.post(CHAT, json=body)
    assert response.status_code == status, response.text
    assert match in response.json()["error"]["message"]
    assert client.get("/health").json()["status"] == "ok"  # and it keeps serving


def test_bodies_images_and_files_beyond_the_limits(serve, tmp_path):
    client = serve(max_request_bytes=2000)
    big = {"messages": [_user("x" * 3000)]}
    assert client.post(CHAT, json=big).status_code == 413
    (tmp_path / "ok").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "ok" / "red.png")
    Image.new("RGB", (8, 8), "red").save(tmp_path / "secret.png")
    client = serve(allow_local_images=tmp_path / "ok")
    inside = {"messages": [_user("hi", "red.png")], "max_tokens": 2}
    assert client.post(CHAT, json=inside).status_code == 200
    outside = {"messages": [_user("hi", "../secret.png")], "max_tokens": 2}
    response = client.post(CHAT, json=outside)
    assert response.status_code == 403 and "outside" in response.json()["error"]["message"]
    images = serve().post("/v1/images/generations", json={"prompt": RED, "response_format": "url"})
    assert images.status_code == 400 and "b64_json" in images.json()["error"]["message"]


def test_a_model_without_a_decoder_refuses_pixels_but_gives_tokens(serve, model):
    decoder = model.decoder
    model.decoder = None
    try:
        client = serve()
        response = client.post("/v1/images/generations", json={"prompt": RED})
        assert response.status_code == 400 and "no visual decoder" in response.text
        body = {"messages": [_user(RED)], "max_tokens": 30,
                "metamorph": {"image": True, "return_visual_tokens": True}}  # fmt: skip
        parts = client.post(CHAT, json=body).json()["choices"][0]["message"]["content"]
        assert [p["type"] for p in parts if p["type"] != "text"] == ["visual_tokens"]
    finally:
        model.decoder = decoder


def test_sampling_options_map_to_the_generation_config(serve, model):
    client = serve()
    body = {"messages": [_user("two plus three")], "max_tokens": 12, "temperature": 0.7,
            "top_p": 0.9, "seed": 3}  # fmt: skip
    got = client.post(CHAT, json=body).json()["choices"][0]["message"]["content"]
    config = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=0.7, top_p=0.9, seed=3)
    (want,) = model.generate("two plus three", config=config)
    assert got == want.text


def test_a_static_cache_server_answers_as_the_library(serve, model):
    client = serve(cache_implementation="static")
    health = client.get("/health").json()
    assert health["cache_implementation"] == "static" and health["continuous_batching"] is False
    body = {"messages": [_user(BLUE)], "max_tokens": 40,
            "metamorph": {"return_visual_tokens": True, "decode_images": False}}  # fmt: skip
    parts = client.post(CHAT, json=body).json()["choices"][0]["message"]["content"]
    (want,) = model.generate(BLUE, max_new_tokens=40)
    assert "<image>".join(p["text"] for p in parts if p["type"] == "text") == want.text
    (tokens,) = [p["visual_tokens"] for p in parts if p["type"] == "visual_tokens"]
    got = np.frombuffer(base64.b64decode(tokens["data"]), "<f4").reshape(tokens["shape"])
    assert torch.allclose(torch.from_numpy(got.copy()), want.images[0], atol=1e-5)
    from metamorph_serve.settings import ServeSettings

    with pytest.raises(ValueError, match="compile=True compiles the step on a static cache"):
        ServeSettings(compile=True)
