"""The chat page at ``/`` in a real headless Chromium (the OS package, driven by playwright):
an uploaded image and a prompt go out, the streamed answer is the API's own, a generated
image appears, and a server with an API key asks for it. A screenshot of the page is saved to
``$METAMORPH_TEST_ARTIFACTS`` (or the test's tmp dir) as ``chat-page.png``."""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from metamorph_core.testing.trained import RED

CHAT = "/v1/chat/completions"
WAIT_MS = 30_000  # for anything the model answers; the tiny model takes well under a second
expect.set_options(timeout=WAIT_MS)


def _chromium_path(playwright) -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    bundled = playwright.chromium.executable_path  # `playwright install chromium`'s, if any
    if Path(bundled).is_file():
        return bundled
    reason = (
        "no Chromium: install the OS package (`apt-get install chromium`; .ci/run does) "
        "or `playwright install chromium`"
    )
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=_chromium_path(playwright), args=["--no-sandbox"]
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A fresh page (its own session storage); ``page.problems`` collects console errors and
    uncaught exceptions."""
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.problems = []
    page.on("console", lambda m: page.problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.problems.append(f"uncaught: {e}"))
    yield page
    context.close()


def _answer_text(message) -> str:
    return "".join(message.locator(".text").all_text_contents())


def _sent(page, action) -> dict:
    """The chat request body the page sends when ``action()`` runs."""
    with page.expect_request(lambda r: r.url.endswith(CHAT) and r.method == "POST") as request:
        action()
    return request.value.post_data_json


def _replayed(base: str, body: dict) -> list:
    """The same request, not streamed: the answer's content as parts."""
    response = httpx.post(base + CHAT, json={**body, "stream": False}, timeout=WAIT_MS / 1000)
    response.raise_for_status()
    content = response.json()["choices"][0]["message"]["content"]
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def test_the_page_streams_the_answer_and_shows_the_generated_image(live, page, model, tmp_path):
    base = live()
    page.goto(base)
    expect(page.locator("#model")).to_have_text("metamorph · ready")
    Image.new("RGB", (16, 16), (230, 25, 25)).save(tmp_path / "red.png")
    page.set_input_files("#attach", tmp_path / "red.png")
    expect(page.locator("#attachments img")).to_have_count(1)
    page.fill("#max_tokens", "40")
    page.fill("#prompt", "what colour is the shape?")

    body = _sent(page, lambda: page.press("#prompt", "Enter"))
    (user,) = body["messages"]
    assert user["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert user["content"][1] == {"type": "text", "text": "what colour is the shape?"}
    assert body["stream"] is True and body["temperature"] == 0 and body["max_tokens"] == 40
    answer = page.locator(".message.assistant").last
    expect(page.locator("#send")).to_be_enabled()  # the stream has ended
    text = _answer_text(answer)
    assert text and [{"type": "text", "text": text}] == _replayed(base, body)
    expect(page.locator(".message.user img.attached")).to_have_count(1)
    expect(page.locator("#attachments img")).to_have_count(0)

    page.check("#image")
    page.fill("#decoder_steps", "2")
    page.fill("#decoder_seed", "7")
    page.fill("#prompt", RED)
    body = _sent(page, lambda: page.click("#send"))
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][1]["content"] == text  # the conversation so far goes along
    assert body["metamorph"] == {
        "visual_guidance_scale": 1,
        "image": True,
        "decoder": {"steps": 2, "seed": 7},
    }
    image = page.locator(".message.assistant").last.locator("img.generated")
    expect(image).to_have_attribute("src", re.compile(r"^data:image/png;base64,"))
    width = image.evaluate("img => img.decode().then(() => img.naturalWidth)")
    assert width == model.decoder.image_size[1]
    expect(page.locator("#send")).to_be_enabled()
    (want,) = [p for p in _replayed(base, body) if p["type"] == "image_url"]
    assert image.get_attribute("src") == want["image_url"]["url"]  # the seeded decoder's

    artifacts = Path(os.environ.get("METAMORPH_TEST_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=artifacts / "chat-page.png")
    shot = Image.open(io.BytesIO((artifacts / "chat-page.png").read_bytes()))
    assert shot.size == (1100, 800)
    assert page.problems == []
    assert page.locator(".error").count() == 0


def test_the_page_asks_for_the_api_key_and_then_answers(live, page, model):
    base = live(api_key="sesame")
    page.goto(base)
    expect(page.locator(".error")).to_contain_text("needs an API key")  # GET /v1/models: 401
    page.fill("#max_tokens", "20")
    page.fill("#prompt", "two plus three")
    page.click("#send")
    expect(page.locator(".error")).to_have_count(2)
    expect(page.locator(".error").last).to_contain_text("enter it under Settings")
    expect(page.locator("#prompt")).to_have_value("two plus three")  # back, to send again
    expect(page.locator(".message")).to_have_count(0)

    page.fill("#api-key", "sesame")
    page.press("#api-key", "Tab")  # committed: kept in session storage, models fetched again
    expect(page.locator("#model")).to_have_text("metamorph · ready")
    expect(page.locator(".error")).to_have_count(0)
    assert page.evaluate("sessionStorage.getItem('metamorph-api-key')") == "sesame"
    body = _sent(page, lambda: page.click("#send"))
    (user,) = body["messages"]
    assert user["content"] == [{"type": "text", "text": "two plus three"}]
    expect(page.locator("#send")).to_be_enabled()
    (want,) = model.generate("two plus three", max_new_tokens=20)
    assert _answer_text(page.locator(".message.assistant")) == want.text
    unauthorized = [p for p in page.problems if "status of 401" not in p]
    assert unauthorized == [], "only the refused requests may log errors"
