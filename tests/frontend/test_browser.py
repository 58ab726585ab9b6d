"""The page in headless Chromium: upload an image, ask, watch the reply stream in, upvote and flag, then ask again
and vote on the first reply with its 👎."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import redis
from PIL import Image

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
    worker = start_worker(redis_url, step_delay_s=0.15, reply_tokens=24)
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


def open_page(p, url: str, width: int = 1280, height: int = 1000):
    """A new headless Chromium page on `url` with its model list loaded."""
    browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(url)
    page.wait_for_selector("#model input")
    wait_for(lambda: page.input_value("#model input").startswith(MODEL), what="the model list")
    return browser, page


def ask(page, text: str, image: Path | None = None) -> None:
    """Type `text` (with `image` attached), press Send and wait for the reply to finish."""
    if image is not None:
        page.set_input_files("#textbox input[type=file]", str(image))
        page.wait_for_selector("#textbox img", timeout=15000)
    page.fill("#textbox textarea", text)
    page.click("#send")
    wait_for(
        lambda: page.locator("#regenerate").is_enabled() and page.locator("#chatbot .message.bot").count(),
        what="the reply",
    )


def test_the_chat_panels_own_clear_forgets_the_conversation(slow_web_url, redis_url):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser, page = open_page(p, slow_web_url)
        try:
            ask(page, "[[tokens=2]] first question", EXAMPLES_DIR / "demo_0_red_circle.png")
            page.click("#chatbot button[aria-label='Clear']")
            wait_for(lambda: page.locator("#chatbot .message").count() == 0, 10, "the chat to clear")
            ask(page, "[[tokens=2]] second question")
            assert page.locator("#chatbot .message.user").count() == 1
            assert page.locator("#chatbot img").count() == 0
            page.click("#upvote")
            page.wait_for_selector("text=Thanks, your upvote was recorded.")
        finally:
            browser.close()
    (entry,) = read_feedback(redis.Redis.from_url(redis_url))
    assert [m.role for m in entry.messages] == ["user", "assistant"] and not entry.images
    assert entry.messages[0].content[-1].text == "[[tokens=2]] second question"


def test_a_page_opened_before_any_worker_finds_the_model_without_a_reload(controller_url, redis_url):
    playwright = pytest.importorskip("playwright.sync_api")
    with launched_ui(controller_url, model_list_refresh_s=0.5) as url, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            page.wait_for_selector("text=No model is available yet")
            worker = start_worker(redis_url)
            try:
                wait_for(lambda: page.input_value("#model input") == MODEL, 20, "the model list to refresh itself")
                wait_for(lambda: not page.locator("text=No model is available yet").count(), 10, "the note to go")
                ask(page, "[[tokens=2]] hello")
                assert page.locator("#chatbot .message.bot").last.inner_text().startswith("hello")
            finally:
                worker.stop()
        finally:
            browser.close()


def test_two_sends_in_quick_succession_keep_both_messages(slow_web_url):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser, page = open_page(p, slow_web_url)
        try:
            page.fill("#textbox textarea", "[[tokens=2]] first")
            page.click("#send")
            wait_for(lambda: page.input_value("#textbox textarea") == "", 5, "the textbox to empty")
            page.fill("#textbox textarea", "[[tokens=2]] second")
            assert not page.locator("#regenerate").is_enabled()  # the first reply is not written yet
            page.click("#send")
            users = page.locator("#chatbot .message.user")
            wait_for(lambda: users.count() == 2, 15, "both messages in the chat")
            wait_for(lambda: page.locator("#regenerate").is_enabled(), 15, "the replies")
            assert [users.nth(i).inner_text() for i in range(2)] == ["[[tokens=2]] first", "[[tokens=2]] second"]
            bots = page.locator("#chatbot .message.bot")
            # Answered one after the other, or together when the second came before the first reply started.
            assert bots.count() in (1, 2) and "▌" not in bots.last.inner_text()
            assert not page.locator("#stop").is_enabled() and page.input_value("#textbox textarea") == ""
        finally:
            browser.close()


# Set LLAVA_SCREENSHOT_PHONE=docs/screenshot-phone.png and LLAVA_SCREENSHOT_LAPTOP=docs/screenshot-laptop.png to
# refresh the README's phone and laptop pictures from this test.
SCREENSHOTS = {"phone": os.environ.get("LLAVA_SCREENSHOT_PHONE"), "laptop": os.environ.get("LLAVA_SCREENSHOT_LAPTOP")}


@pytest.mark.parametrize("width, height", [(390, 844), (1366, 768)], ids=["phone", "laptop"])
def test_typing_sending_stopping_and_voting_need_no_scrolling(slow_web_url, tmp_path, width, height):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser, page = open_page(p, slow_web_url, width, height)
        try:
            ask(page, "[[tokens=6]] What shape is it?", EXAMPLES_DIR / "demo_0_red_circle.png")
            page.evaluate("window.scrollTo(0, 0)")
            for selector in ("#textbox textarea", "#send", "#stop", "#upvote", "#downvote"):
                box = page.locator(selector).bounding_box()
                assert box is not None and 0 <= box["y"] and box["y"] + box["height"] <= height, (selector, box)
                assert 0 <= box["x"] and box["x"] + box["width"] <= width, (selector, box)
            shot = tmp_path / "screen.png"
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    target = SCREENSHOTS["phone" if width < 500 else "laptop"]
    if target:
        shutil.copyfile(shot, target)


def test_no_thumbs_on_a_reply_being_written_or_failed(slow_web_url):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser, page = open_page(p, slow_web_url)
        try:
            thumbs = page.locator("#chatbot button[aria-label^='Like']:visible")
            page.fill("#textbox textarea", "[[tokens=12]] a long one")
            page.click("#send")
            wait_for(lambda: "▌" in page.locator("#chatbot").inner_text(), 15, "the reply to stream")
            assert thumbs.count() == 0
            wait_for(lambda: page.locator("#regenerate").is_enabled(), 15, "the reply")
            assert thumbs.count() == 1  # finished: votable
            ask(page, "[[device-error]] and now")  # the scripted worker fails this one
            last = page.locator("#chatbot .message.bot").last
            wait_for(lambda: "The model failed" in last.inner_text(), 10, "the error reply")
            assert thumbs.count() == 1  # still only the first reply's
        finally:
            browser.close()


def test_only_the_image_modes_the_model_supports_are_offered(controller_url, redis_url, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    wide = tmp_path / "wide.png"
    Image.new("RGB", (96, 48), (200, 30, 30)).save(wide)
    worker = start_worker(redis_url, image_modes=["default", "resize"])
    try:
        with launched_ui(controller_url) as url, playwright.sync_playwright() as p:
            browser, page = open_page(p, url)
            try:
                modes = page.locator("#image-mode label")
                wait_for(lambda: modes.count() == 2, 10, "the model's image modes")
                assert [modes.nth(i).inner_text().strip() for i in range(2)] == ["Resize", "Default"]
                page.click("#image-mode label:has-text('Resize')")
                ask(page, "[[tokens=2]] which shape", wide)
                shown = page.locator("#chatbot img").first
                wait_for(lambda: shown.evaluate("img => img.naturalWidth") > 0, 10, "the image to load")
                assert shown.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [96, 96]  # stretched square
            finally:
                browser.close()
    finally:
        worker.stop()
