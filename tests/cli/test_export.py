"""`llava-serve export`: exchanges logged by the controller and votes posted to it become LLaVA's instruction format
(loadable as LLaVA's training code loads it, every image file present, bytes unchanged) and preference pairs.
Real Redis, the controller in-process, scripted worker."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import redis
from fastapi.testclient import TestClient

from broker.app import create_app
from cli.main import main
from tests.broker.scripted_worker import FAST, ScriptedWorker, chat_body, png_b64, settings_for

MODEL = "tiny-llava"


def data_url(b64: str) -> str:
    return f"data:image/png;base64,{b64}"


def vote(client: TestClient, kind: str, image: str, question: str, reply: str) -> None:
    picture = {"type": "image_url", "image_url": {"url": data_url(image)}}
    messages = [
        {"role": "user", "content": [picture, {"type": "text", "text": question}]},
        {"role": "assistant", "content": reply},
    ]
    response = client.post("/api/v1/feedback", json={"type": kind, "model": MODEL, "messages": messages})
    assert response.status_code == 200, response.text


def load_llava(out: Path) -> list[dict]:
    """As LLaVA's LazySupervisedDataset reads `--data_path` and `--image_folder`: json.load, then each image path."""
    rows = json.load(open(out / "llava_instruct.json"))  # noqa: SIM115 - as LLaVA's train.py does
    for row in rows:
        assert set(row) <= {"id", "image", "conversations"}
        names = [row["image"]] if isinstance(row.get("image"), str) else row.get("image", [])
        for name in names:
            assert (out / "images" / name).is_file()
        speakers = [turn["from"] for turn in row["conversations"]]
        assert speakers == ["human", "gpt"] * (len(speakers) // 2) and speakers
        assert sum(turn["value"].count("<image>") for turn in row["conversations"]) == len(names)
    return rows


def test_export_writes_llava_format_with_images_bit_for_bit_and_preference_pairs(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    worker = ScriptedWorker(redis_client).register()
    cat, dog = png_b64(color=(10, 20, 30)), png_b64(width=9, color=(200, 100, 0))
    settings = settings_for(redis_url, log_conversations=True)
    with TestClient(create_app(settings, timings=FAST, run_sweeper=False)) as client:
        for image, reply in ((cat, "a cat"), (dog, "a dog")):
            thread = worker.in_thread(lambda w, reply=reply: w.serve_one([reply]))
            assert client.post("/v1/chat/completions", json=chat_body(text="what?", images=[image])).status_code == 200
            thread.result()
        thread = worker.in_thread(lambda w: w.serve_one(["plain"]))
        assert client.post("/v1/completions", json={"model": MODEL, "prompt": "USER: hi"}).status_code == 200
        thread.result()
        vote(client, "downvote", cat, "what?", "a dog")
        vote(client, "upvote", cat, "what?", "a cat")  # the regenerated reply
        vote(client, "flag", dog, "what?", "rude words")

    out = tmp_path / "all"
    assert main(["export", "--out", str(out), "--redis-url", redis_url]) == 0
    rows = load_llava(out)
    assert [row["conversations"] for row in rows] == [
        [{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "a cat"}],
        [{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "a dog"}],
    ]  # the legacy prompt is templated text, not turns: left out
    for row, original in zip(rows, (cat, dog), strict=True):
        assert (out / "images" / row["image"]).read_bytes() == base64.b64decode(original)
    assert json.loads((out / "llava_instruct.jsonl").read_text().splitlines()[0]) == rows[0]

    pairs = [json.loads(line) for line in (out / "preference_pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 1
    assert pairs[0]["conversations"] == [{"from": "human", "value": "<image>\nwhat?"}]
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == ("a cat", "a dog")
    assert (out / "images" / pairs[0]["image"]).read_bytes() == base64.b64decode(cat)

    flagged = tmp_path / "flagged"
    assert main(["export", "--out", str(flagged), "--redis-url", redis_url, "--only", "flagged"]) == 0
    rows = load_llava(flagged)
    assert [row["conversations"][1]["value"] for row in rows] == ["rude words"]
    assert rows[0]["id"].startswith("feedback-")
    assert (flagged / "images" / rows[0]["image"]).read_bytes() == base64.b64decode(dog)

    for extra in (["--model", "another-model"], ["--since", "2999-01-01"], ["--until", "2001-01-01T00:00:00"]):
        empty = tmp_path / extra[0].strip("-")
        assert main(["export", "--out", str(empty), "--redis-url", redis_url, *extra]) == 0
        assert load_llava(empty) == [] and (empty / "preference_pairs.jsonl").read_text() == ""


def test_a_conversation_of_several_turns_is_one_example_at_its_longest(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    worker = ScriptedWorker(redis_client).register()
    picture = png_b64(color=(7, 7, 7))
    first_turn = chat_body(text="what?", images=[picture])
    with TestClient(create_app(settings_for(redis_url, log_conversations=True), timings=FAST, run_sweeper=False)) as c:
        for reply in ("a square", "a circle"):  # the second is a regenerated reply to the same turn
            thread = worker.in_thread(lambda w, reply=reply: w.serve_one([reply]))
            assert c.post("/v1/chat/completions", json=first_turn).status_code == 200
            thread.result()
        follow_up = [{"role": "assistant", "content": "a square"}, {"role": "user", "content": "colour?"}]
        second_turn = {**first_turn, "messages": [*first_turn["messages"], *follow_up]}
        thread = worker.in_thread(lambda w: w.serve_one(["grey"]))
        assert c.post("/v1/chat/completions", json=second_turn).status_code == 200
        thread.result()
    out = tmp_path / "out"
    assert main(["export", "--out", str(out), "--redis-url", redis_url]) == 0
    rows = load_llava(out)
    assert [[turn["value"] for turn in row["conversations"]] for row in rows] == [
        ["<image>\nwhat?", "a circle"],
        ["<image>\nwhat?", "a square", "colour?", "grey"],
    ]
