"""Image pre-processing modes and the conversation's request / display shapes."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from contract.feedback_messages import FeedbackType
from frontend.conversation import LEFT_OUT, PAD_COLOUR, ChatImage, Conversation, ImageMode, preprocess_image
from tests.frontend.conftest import text_of


def wide(w: int = 300, h: int = 100, colour=(200, 10, 10), mode: str = "RGB") -> Image.Image:
    return Image.new(mode, (w, h), colour)


def test_crop_takes_the_center_square():
    img = wide()
    img.paste((0, 0, 255), (100, 0, 200, 100))  # the middle third is blue
    out = preprocess_image(img, ImageMode.crop, 1344)
    assert out.size == (100, 100)
    assert out.getpixel((0, 0)) == (0, 0, 255) and out.getpixel((99, 99)) == (0, 0, 255)


def test_resize_stretches_to_a_square_on_the_long_side():
    assert preprocess_image(wide(), ImageMode.resize, 1344).size == (300, 300)


def test_pad_fills_with_the_clip_mean_colour():
    out = preprocess_image(wide(), "pad", 1344)
    assert out.size == (300, 300)
    assert out.getpixel((150, 0)) == PAD_COLOUR
    assert out.getpixel((150, 150)) == (200, 10, 10)


def test_default_keeps_the_image_as_uploaded():
    assert preprocess_image(wide(), ImageMode.default, 1344).size == (300, 100)


@pytest.mark.parametrize("mode", list(ImageMode))
def test_the_long_side_is_capped(mode):
    out = preprocess_image(wide(1000, 500), mode, 256)
    assert max(out.size) == 256


def test_transparent_and_palette_images_become_rgb():
    assert preprocess_image(wide(mode="RGBA", colour=(0, 0, 0, 0)), ImageMode.default, 64).mode == "RGB"
    assert preprocess_image(wide(mode="P", colour=3), ImageMode.default, 64).mode == "RGB"


def test_images_are_png_named_by_sha256(tmp_path):
    path = tmp_path / "a.jpg"
    wide().save(path)
    image = ChatImage.from_file(path, ImageMode.default, 1344)
    assert image.png.startswith(b"\x89PNG")
    assert len(image.digest) == 64
    assert Image.open(image.path).size == (300, 100)


def test_every_turn_resends_the_whole_conversation_with_its_images(tmp_path):
    first = ChatImage.from_image(wide(), ImageMode.default, 1344)
    second = ChatImage.from_image(wide(colour=(0, 200, 0)), ImageMode.pad, 1344)
    conv = Conversation()
    conv.add_user("what is this?", [first])
    reply = conv.start_reply()
    reply.text, reply.finished = "a red box", True
    conv.add_user("and this one?", [second])
    conv.start_reply()
    messages = conv.request_messages()
    assert [m.role for m in messages] == ["user", "assistant", "user"]
    urls = [p.image_url.url for m in messages if m.role == "user" for p in m.content if p.type == "image_url"]
    assert len(urls) == 2
    assert all(u.startswith("data:image/png;base64,") for u in urls)
    assert base64.b64decode(urls[1].split(",", 1)[1]) == second.png
    assert Image.open(io.BytesIO(second.png)).size == (300, 300)
    shown = conv.chatbot_messages()
    assert shown[0] == {"role": "user", "content": {"path": first.path, "alt_text": "uploaded image"}}
    assert shown[1] == {"role": "user", "content": "what is this?"}
    assert shown[2] == {"role": "assistant", "content": "a red box"}


def answer(conv: Conversation, text: str, *, failed: bool = False, job_id: str | None = None) -> None:
    reply = conv.start_reply()
    reply.text, reply.failed, reply.finished, reply.job_id = text, failed, True, job_id
    reply.status = "⚠️ no worker" if failed else ""


def sent(messages) -> list[tuple[str, object]]:
    """(role, content) of each message, a user's parts as texts and "<image>"."""
    return [
        (m.role, m.content if isinstance(m.content, str) else [getattr(p, "text", "<image>") for p in m.content])
        for m in messages
    ]


def test_failed_replies_are_not_sent_back_to_the_model():
    image = ChatImage.from_image(wide(), ImageMode.default, 1344)
    conv = Conversation()
    conv.add_user("hi", [])
    answer(conv, "hello", job_id="j1")
    conv.add_user("what is this?", [image])
    answer(conv, "", failed=True, job_id="j2")
    assert conv.drop_last_reply()  # Regenerate asks the failed question again
    conv.start_reply()
    assert sent(conv.request_messages()) == [
        ("user", ["hi"]),
        ("assistant", "hello"),
        ("user", ["<image>", "what is this?"]),
    ]
    answer(conv, "half a repl", failed=True, job_id="j3")  # failed mid-stream: the partial text goes too
    conv.add_user("again", [])
    assert sent(conv.request_messages()) == [("user", ["hi"]), ("assistant", "hello"), ("user", ["again"])]
    assert conv.job_ids() == ["j1"]
    shown = conv.chatbot_messages()  # the failed exchange stays on screen with its error
    assert text_of(shown[3]) == "what is this?" and text_of(shown[4]) == f"half a repl\n\n⚠️ no worker\n\n{LEFT_OUT}"


def test_a_reply_stopped_before_any_text_is_left_out_and_a_partial_one_kept():
    conv = Conversation()
    conv.add_user("one", [])
    answer(conv, "")  # stopped before the first token
    conv.add_user("two", [])
    answer(conv, "partial")  # stopped after some text
    conv.add_user("three", [])
    assert sent(conv.request_messages()) == [("user", ["two"]), ("assistant", "partial"), ("user", ["three"])]
    assert text_of(conv.chatbot_messages()[1]) == LEFT_OUT


def test_messages_sent_before_a_reply_are_asked_together():
    first = ChatImage.from_image(wide(), ImageMode.default, 1344)
    second = ChatImage.from_image(wide(colour=(0, 0, 200)), ImageMode.default, 1344)
    conv = Conversation()
    conv.add_user("describe this", [first])
    conv.add_user("and compare it with this", [second])  # its reply had not started yet
    conv.start_reply()
    assert sent(conv.request_messages()) == [
        ("user", ["<image>", "<image>", "describe this\n\nand compare it with this"])
    ]


def test_an_earlier_reply_is_judged_with_the_conversation_up_to_it():
    image = ChatImage.from_image(wide(), ImageMode.default, 1344)
    conv = Conversation()
    conv.add_user("what is this?", [image])
    answer(conv, "a red box", job_id="j1")
    conv.add_user("are you sure", [])
    answer(conv, "", failed=True, job_id="j2")
    conv.add_user("its colour?", [])
    answer(conv, "red", job_id="j3")
    assert sent(conv.reply_messages(1)) == [("user", ["<image>", "what is this?"]), ("assistant", "a red box")]
    assert conv.job_ids(2) == ["j1"] and conv.job_ids() == ["j1", "j3"]
    assert sent(conv.reply_messages(5))[-2:] == [("user", ["its colour?"]), ("assistant", "red")]
    with pytest.raises(ValueError, match=r"turns\[3\] is not an answered reply"):
        conv.reply_messages(3)
    # Chatbot positions: the image and the text of turn 0, then one message per turn.
    assert [conv.shown_turn(i)[0] for i in range(7)] == [0, 0, 1, 2, 3, 4, 5]
    assert conv.shown_turn(2) == (1, "a red box") and conv.shown_turn(7) is None and conv.shown_turn(-1) is None
    conv.turns[5].vote = FeedbackType.downvote
    assert conv.feedback_values() == [None, None, "Dislike"]
