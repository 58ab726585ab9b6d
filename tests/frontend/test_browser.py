"""The page in headless Chromium: upload an image, ask, watch the reply stream in, upvote and flag, then ask again
and vote on the first reply with its 👎."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import redis

from broker.feedback import read_feedback
from frontend.app import EXAMPLES_DIR
from tests.frontend.conftest import MODEL, launched_ui, start_worker
from tests.workers.harness import wait_for

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Set LLAVA_SCREENSHOT=docs/screenshot.png to refresh the README's picture from this test.
SCREENSHOT = os.environ.get("LLAVA_SCREENSHOT")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"
    ),
]


@pytest.fixture
def slow_web_url(controller_url, redis_url):
    """The UI over a scripted worker (a stand-in, not a model) slow enough for the page to show the stream."""
    worker = start_worker(redis_url, step_delay=0.15, reply_tokens=24)
    try:
        with launched_ui(controller_url) as url:
            yield f"{url}/?model={MODEL}"
    finally:
        worker.stop()


def test_upload_ask_stream_vote_and_flag(slow_web_url, redis_url, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(slow_web_url)
            page.wait_for_selector("#model input")
            wait_for(lambda: page.input_value("#model input").startswith(MODEL), what="the model list")
            page.set_input_files("#textbox input[type=file]", str(EXAMPLES_DIR / "demo_0_red_circle.png"))
            page.wait_for_selector("#textbox img", timeout=15000)
            page.fill("#textbox textarea", "What colour is the shape?")
            page.click("#send")
            bot = page.locator("#chatbot .message.bot").last
            seen = []

            def finished() -> bool:
                if bot.count():
                    text = bot.inner_text()
                    if not seen or seen[-1] != text:
                        seen.append(text)
                return page.locator("#upvote").is_enabled()

            wait_for(finished, what="the reply")
            finished()
            assert sum(t.endswith("▌") for t in seen) >= 3, seen  # partial replies were on screen before the last
            assert seen[-1].startswith("What colour is the shape? What colour")
            assert page.locator("#chatbot img").count() >= 1
            page.click("#upvote")
            page.wait_for_selector("text=Thanks, your upvote was recorded.")
            thumbs = page.locator("#chatbot button[aria-label^='Like'], #chatbot button[aria-label^='Dislike']")
            wait_for(
                lambda: thumbs.nth(1).get_attribute("aria-label") == "Liked", 10, "the reply's 👍 to show the vote"
            )
            page.fill("#flag-reason textarea", "the shape is red, not described")
            page.click("#flag")
            page.wait_for_selector("text=Flag recorded")
            wait_for(lambda: not page.locator("#flag").is_enabled(), 10, "the flag button to disable")
            assert not page.locator("#upvote").is_enabled() and page.locator("#regenerate").is_enabled()
            shot = tmp_path / "screenshot.png"
            page.screenshot(path=str(shot), full_page=True)
            page.fill("#textbox textarea", "[[tokens=3]] And its size?")
            page.click("#send")
            # The vote buttons were disabled by the vote: enabled again once the second reply is done.
            wait_for(lambda: bot.count() and page.locator("#upvote").is_enabled(), what="the second reply")
            assert page.locator("#chatbot .message.bot").count() == 2
            thumbs.nth(0).click()  # 👎 on the first reply
            page.wait_for_selector("text=Thanks, your downvote on reply 1 was recorded.")
            assert thumbs.nth(0).get_attribute("aria-label") == "Disliked"
        finally:
            browser.close()
    if SCREENSHOT:
        shutil.copyfile(shot, SCREENSHOT)
    entries = read_feedback(redis.Redis.from_url(redis_url))
    assert [(e.type.value, e.reason) for e in entries] == [
        ("upvote", ""),
        ("flag", "the shape is red, not described"),
        ("downvote", ""),
    ]
    assert entries[1].images and entries[1].messages[0].content[0].type == "image"
    # The 👎 came after a second turn but records the first, as the upvote did.
    assert (entries[2].messages, entries[2].job_ids, entries[2].params) == (
        entries[0].messages,
        entries[0].job_ids,
        entries[0].params,
    )
