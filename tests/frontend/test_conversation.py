"""Image pre-processing modes and the conversation's request / display shapes."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from frontend.conversation import PAD_COLOUR, ChatImage, Conversation, ImageMode, preprocess_image


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
    out = preprocess_image(wide(), "Pad", 1344)
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


def test_failed_replies_are_not_sent_back_to_the_model():
    conv = Conversation()
    conv.add_user("hi", [])
    reply = conv.start_reply()
    reply.failed, reply.status, reply.finished = True, "⚠️ no worker", True
    assert conv.drop_last_reply()
    conv.start_reply()
    assert [m.role for m in conv.request_messages()] == ["user"]
    conv.add_user("again", [])
    assert [m.role for m in conv.request_messages()] == ["user", "user"]
