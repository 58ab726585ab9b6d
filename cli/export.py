"""`llava-serve export`: a training set from the conversation log and the feedback stream.

Writes, into `--out DIR`:
- `llava_instruct.json`: a JSON list in LLaVA's instruction format, what LLaVA's `train.py --data_path` loads with
  `--image_folder DIR/images`: `{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": ...}, ...]}` (`image` a file name, or a list of them for several images; absent for
  text-only examples). The same rows, one a line, in `llava_instruct.jsonl`.
- `preference_pairs.jsonl`: `{"id", "image", "conversations", "chosen", "rejected"}` for each downvoted reply and an
  upvoted alternative to the same conversation (a regenerated reply), `conversations` ending with the human turn.
- `images/<sha256>.<ext>`: each image once, its bytes exactly as uploaded.

Without `--only`, the examples are the logged exchanges that ended normally (stop, eos, length) from the chat
endpoints, each conversation once, at its longest (every turn is logged with the conversation so far); legacy and
LLaVA-wire prompts are already templated text, not turns, and are left out. With `--only`, they are the feedback
entries of that kind. Examples whose images are no longer stored are skipped and counted.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from redis import Redis

from broker.convlog import read_conversations
from broker.feedback import read_feedback
from contract import keys
from contract.feedback_messages import FeedbackEntry, FeedbackType
from contract.messages import JobImage, JobMessage, JobText

IMAGE_TOKEN = "<image>"
ONLY = {"flagged": FeedbackType.flag, "upvoted": FeedbackType.upvote, "downvoted": FeedbackType.downvote}
_ROLES = {"user": "human", "assistant": "gpt"}
_EXTENSIONS = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpg"),
    (b"GIF8", "gif"),
    (b"BM", "bmp"),
)
_NORMAL_ENDS = {"stop", "eos", "length"}


def image_extension(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in _EXTENSIONS if data.startswith(magic)), "bin")


def stream_bound(value: str | None, default: str) -> str:
    """A stream id bound from a Unix time or an ISO date/time (UTC unless it says otherwise)."""
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        moment = datetime.fromisoformat(value)
        seconds = (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()
    return str(int(seconds * 1000))


@dataclass
class Export:
    """What an export wrote."""

    examples: int = 0
    pairs: int = 0
    images: int = 0
    skipped: list[str] = field(default_factory=list)  # ids whose images expired


def turns(messages: list[JobMessage]) -> list[dict[str, str]]:
    """LLaVA's `conversations` of `messages`: each part on a line of its own, an image as `<image>`; system turns
    are dropped (LLaVA's templates supply their own)."""
    return [
        {
            "from": _ROLES[message.role],
            "value": "\n".join(IMAGE_TOKEN if isinstance(p, JobImage) else p.text for p in message.content),
        }
        for message in messages
        if message.role in _ROLES
    ]


def image_digests(messages: list[JobMessage]) -> list[str]:
    return [p.digest for m in messages for p in m.content if isinstance(p, JobImage)]


class Exporter:
    def __init__(self, redis: Redis, out: Path) -> None:
        self.redis = redis
        self.out = out
        self.images_dir = out / "images"
        self.written: dict[str, str] = {}  # digest -> file name
        self.report = Export()

    def image_field(self, digests: list[str], example_id: str) -> dict[str, object] | None:
        """The example's `image` field, writing each image once; None when one is no longer stored."""
        names = []
        for digest in digests:
            if digest not in self.written:
                data = self.redis.get(keys.image(digest))
                if data is None:
                    self.report.skipped.append(example_id)
                    return None
                name = f"{digest}.{image_extension(data)}"
                self.images_dir.mkdir(parents=True, exist_ok=True)
                (self.images_dir / name).write_bytes(data)
                self.written[digest] = name
                self.report.images += 1
            names.append(self.written[digest])
        if not names:
            return {}
        return {"image": names[0] if len(names) == 1 else names}

    def example(self, example_id: str, messages: list[JobMessage]) -> dict | None:
        image = self.image_field(image_digests(messages), example_id)
        if image is None:
            return None
        return {"id": example_id, **image, "conversations": turns(messages)}


def _with_reply(messages: list[JobMessage], reply: str) -> list[JobMessage]:
    return [*messages, JobMessage(role="assistant", content=[JobText(text=reply)])]


def preference_pairs(entries: list[FeedbackEntry]) -> list[tuple[FeedbackEntry, FeedbackEntry]]:
    """(upvoted, downvoted) entries that judge different replies to the same conversation, oldest downvote first."""
    ups = [e for e in entries if e.type == FeedbackType.upvote and e.messages[-1].role == "assistant"]
    pairs = []
    for down in entries:
        if down.type != FeedbackType.downvote or down.messages[-1].role != "assistant":
            continue
        for up in ups:
            if up.messages[:-1] == down.messages[:-1] and up.messages[-1] != down.messages[-1]:
                pairs.append((up, down))
                break
    return pairs


def whole_conversations(chats: list[tuple[str, list[JobMessage]]]) -> list[tuple[str, list[JobMessage]]]:
    """Each exchange is logged with the conversation so far, so turn 1 of a chat is also the start of turn 2's
    record: keep only the exchanges that no later one continues (a regenerated reply, which differs, is kept)."""

    def key(messages: list[JobMessage]) -> str:
        return json.dumps([m.model_dump(mode="json") for m in messages])

    continued = set()
    for _, messages in chats:
        for end, message in enumerate(messages[:-1], start=1):
            if message.role == "assistant":
                continued.add(key(messages[:end]))
    return [(example_id, messages) for example_id, messages in chats if key(messages) not in continued]


def reply_text(message: JobMessage) -> str:
    return "".join(p.text for p in message.content if isinstance(p, JobText))


def export_dataset(
    redis: Redis,
    out: Path,
    *,
    since: str | None = None,
    until: str | None = None,
    model: str | None = None,
    only: str | None = None,
) -> Export:
    """Write the dataset of the selection into `out` (see the module docstring); returns what was written."""
    start, end = stream_bound(since, "-"), stream_bound(until, "+")
    exporter = Exporter(redis, out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    feedback = [e for e in read_feedback(redis, start=start, end=end) if model is None or e.model == model]
    if only is None:
        chats = [
            (f"conv-{record.record_id}", _with_reply(record.messages, record.reply))
            for record in read_conversations(redis, start=start, end=end)
            if record.messages is not None
            and record.finish_reason in _NORMAL_ENDS
            and (model is None or record.model == model)
        ]
        for example_id, messages in whole_conversations(chats):
            row = exporter.example(example_id, messages)
            if row is not None:
                rows.append(row)
    else:
        for entry in feedback:
            if entry.type == ONLY[only]:
                row = exporter.example(f"feedback-{entry.entry_id}", entry.messages)
                if row is not None:
                    rows.append(row)
    pairs = []
    for up, down in preference_pairs(feedback):
        example_id = f"pair-{down.entry_id}-{up.entry_id}"
        row = exporter.example(example_id, down.messages[:-1])
        if row is not None:
            row.update(chosen=reply_text(up.messages[-1]), rejected=reply_text(down.messages[-1]))
            pairs.append(row)
    (out / "llava_instruct.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1))
    with (out / "llava_instruct.jsonl").open("w") as lines:
        lines.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    with (out / "preference_pairs.jsonl").open("w") as lines:
        lines.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in pairs)
    exporter.report.examples, exporter.report.pairs = len(rows), len(pairs)
    return exporter.report


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="directory to write the dataset to")
    parser.add_argument("--redis-url", default=None, help="Redis URL (env LLAVA_REDIS_URL)")
    parser.add_argument("--since", default=None, help="Unix time or ISO date/time (UTC), inclusive")
    parser.add_argument("--until", default=None, help="Unix time or ISO date/time (UTC), inclusive")
    parser.add_argument("--model", default=None, help="only exchanges with this model")
    parser.add_argument(
        "--only", choices=sorted(ONLY), default=None, help="feedback entries of one kind instead of the whole log"
    )


def run_export_command(args: argparse.Namespace) -> int:
    import os

    from infra.redis import connect

    redis = connect(args.redis_url or os.environ.get("LLAVA_REDIS_URL"))
    try:
        report = export_dataset(
            redis, Path(args.out), since=args.since, until=args.until, model=args.model, only=args.only
        )
    finally:
        redis.close()
    print(f"{report.examples} examples, {report.pairs} preference pairs, {report.images} images in {args.out}")
    if report.skipped:
        print(f"skipped {len(report.skipped)} whose images are no longer stored", file=sys.stderr)
    return 0
