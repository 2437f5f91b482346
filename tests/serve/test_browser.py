"""The chat page in headless Chromium: upload an image, ask, watch the answer stream in; boxes are drawn."""

from __future__ import annotations

import os
import shutil

import httpx
import pytest

from seechat.infer.engine import EngineConfig
from tests.infer.tiny_engine import coloured
from tests.serve.conftest import make_server

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM),
        reason=f"{CHROMIUM} is absent: `make browser` apt-installs Debian's chromium for this test",
    ),
]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=shutil.which(CHROMIUM) or CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def test_upload_ask_and_see_the_streamed_answer(browser, serve_model, tmp_path):
    image = tmp_path / "red.png"
    coloured(0, (64, 48)).save(image)
    with make_server(serve_model, EngineConfig(max_batch_size=4)) as server:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('model-name').textContent === 'tiny-seechat'")
        page.set_input_files("#file-input", str(image))
        page.wait_for_selector("#image-preview[src^='data:image/png']")
        page.fill("#prompt", "图里有什么？")
        page.click("#send")
        reply = page.wait_for_selector(".msg.assistant[data-done='true']", timeout=60_000)
        text = reply.inner_text()
        updates = int(reply.get_attribute("data-updates"))
        # the same question through the API (greedy): the page shows exactly that reply
        api = httpx.post(
            f"{server.url}/v1/chat/completions",
            timeout=60,
            json={
                "model": "tiny-seechat",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {"url": page.eval_on_selector("#image-preview", "e => e.src")},
                            },
                            {"type": "text", "text": "图里有什么？"},
                        ],
                    }
                ],
            },
        ).json()["choices"][0]["message"]["content"]
        assert text == api and text
        assert updates > 1  # it streamed in, piece by piece
        assert "prompt tokens" in page.inner_text("#status")

        # a second turn: the history goes with it, the image is not sent again
        page.fill("#prompt", "是什么颜色？")
        page.press("#prompt", "Enter")
        page.wait_for_function(
            "document.querySelectorAll('.msg.assistant[data-done]').length === 2", timeout=60_000
        )
        assert "cached" in page.inner_text("#status")
        assert page.evaluate("seechat.state.messages.length") == 4

        # a <box> in a reply is drawn over the image (0..1000 coordinates)
        page.evaluate(
            "seechat.renderReply(document.createElement('div'), '红色的圆形在<box>(100,200),(300,600)</box>')"
        )
        rect = page.query_selector("#box-layer rect")
        assert [rect.get_attribute(a) for a in ("x", "y", "width", "height")] == ["100", "200", "200", "400"]
        assert (
            page.evaluate("seechat.parseBoxes('<box>(1,2),(3,4)</box> x <box>(5,6),(7,8)</box>').length") == 2
        )
        assert not errors
        page.close()


def test_errors_are_shown_in_the_page(browser, serve_model, tmp_path):
    with make_server(serve_model, api_key="k") as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_selector("#key-box:not([hidden])")  # /v1/models said 401: the page asks for the key
        page.fill("#prompt", "你好")
        page.click("#send")
        page.wait_for_selector(".msg.error")
        assert "API key" in page.inner_text(".msg.error")
        page.fill("#api-key", "k")
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("document.getElementById('model-name').textContent === 'tiny-seechat'")
        page.fill("#prompt", "你好")
        page.click("#send")
        page.wait_for_selector(".msg.assistant[data-done='true']", timeout=60_000)
        page.close()
