import pytest

from tests.workers.tiny_llava import tiny_loaded
from workers.text import IncrementalDecoder, StopMatcher


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_loaded().tokenizer


@pytest.mark.parametrize(
    "text", ["plain ascii text.", "Café naïve 🙂 😀 🚀 日本語のテキスト", "emoji 🐱🌍✨ mixed ümlauts"]
)
def test_deltas_join_to_full_text_and_are_never_broken(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(tokenizer, tokenizer("USER: hi ASSISTANT:")["input_ids"])
    deltas = [decoder.push(i) for i in ids]
    deltas.append(decoder.flush())
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    if any(ord(c) > 127 for c in text):
        assert "" in deltas[:-1]  # some token ended mid-character and was held back


def test_byte_split_character_is_held_back(tokenizer):
    # Force one character per byte token: each byte of "🙂" alone is incomplete UTF-8.
    byte_ids = [tokenizer.convert_tokens_to_ids(tok) for tok in tokenizer.tokenize("🙂")]
    assert len(byte_ids) > 1
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in byte_ids]
    assert "".join(pieces) == "🙂"
    assert pieces[-1].endswith("🙂") and all(p == "" for p in pieces[:-1])


def test_flush_drops_unfinished_character(tokenizer):
    ids = tokenizer("a🙂", add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(tokenizer)
    text = "".join(decoder.push(i) for i in ids[:-1]) + decoder.flush()
    assert "\ufffd" not in text
    assert text.startswith("a")


def test_stop_string_across_deltas():
    matcher = StopMatcher(["STOP"])
    out = []
    for delta in ["hello S", "T", "OP and more"]:
        text, stopped = matcher.push(delta)
        out.append(text)
    assert out == ["hello ", "", ""]
    assert stopped


def test_stop_earliest_of_several_and_cut_rest():
    matcher = StopMatcher(["world", "lo w"])
    assert matcher.push("hello world!") == ("hel", True)
    assert matcher.push("more") == ("", True)


def test_false_start_is_released():
    matcher = StopMatcher(["</end>"])
    assert matcher.push("a </e") == ("a ", False)
    assert matcher.push("nvelope") == ("</envelope", False)
    assert matcher.push("x </") == ("x ", False)
    assert matcher.flush() == "</"


def test_no_stops_passes_through():
    matcher = StopMatcher([])
    assert matcher.push("anything") == ("anything", False)
    assert matcher.flush() == ""
