"""`llava-serve replay`: re-run flagged (optionally voted) conversations against a model, side by side.

Entries come from the feedback stream (`keys.feedback()`), each rebuilt into the `POST /api/v1/generate` body that
produced the judged reply, sent to the chosen model through the controller's HTTP API (the normal queues), and
written as a report: JSONL plus a Markdown or HTML table of the original reply against the new one. Results are
also appended to `keys.replays()`. Decoding is greedy unless `--keep-sampling`, so the same selection gives the
same report twice (the report leaves out job ids and times; the stream keeps them).
"""

from __future__ import annotations

import argparse
import html
import os
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel, Field

from broker.feedback import feedback_generate_request, read_feedback
from contract import keys
from contract.client import ControllerClient
from contract.errors import ControllerUnreachable, LlavaError
from contract.feedback_messages import FeedbackEntry, FeedbackType
from contract.messages import DoneEvent, ErrorEvent, FinishReason, GenerateRequest, JobText, TokenEvent

ROW_FIELD = "row"
REPORT_NAME = "replay"
_VOTES = {FeedbackType.upvote, FeedbackType.downvote}


class ReplaySelection(BaseModel):
    """Which feedback entries to replay: by type, by the model they were judged on, by time, how many."""

    types: set[FeedbackType] = Field(default_factory=lambda: {FeedbackType.flag})
    models: set[str] = Field(default_factory=set, description="original models; empty means any")
    since: float | None = Field(default=None, description="Unix time, inclusive")
    until: float | None = Field(default=None, description="Unix time, inclusive")
    count: int | None = Field(default=None, ge=1, description="the first N matching entries, oldest first")


class ReplayRow(BaseModel):
    """One entry replayed: what was judged, and what the chosen model says now."""

    entry_id: str
    feedback_type: FeedbackType
    reason: str = ""
    original_model: str
    model: str
    prompt: str = Field(description="the last user turn's text; images shown as [image]")
    images: list[str] = Field(default_factory=list)
    original: str | None = Field(default=None, description="the judged reply")
    replay: str = ""
    finish_reason: FinishReason | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    job_id: str | None = Field(default=None, description="kept in the Redis stream, left out of the report")


class ReplayReport(BaseModel):
    run_id: str
    rows: list[ReplayRow]
    jsonl_path: Path
    table_path: Path


def select_entries(redis: Any, selection: ReplaySelection) -> list[FeedbackEntry]:
    """Matching entries, oldest first (stream ids are millisecond times, so the time range is an XRANGE)."""
    start = str(int(selection.since * 1000)) if selection.since is not None else "-"
    end = str(int(selection.until * 1000)) if selection.until is not None else "+"
    chosen = []
    for entry in read_feedback(redis, start=start, end=end, types=selection.types or None):
        if selection.models and entry.model not in selection.models:
            continue
        chosen.append(entry)
        if selection.count is not None and len(chosen) >= selection.count:
            break
    return chosen


def _last_user_text(entry: FeedbackEntry) -> str:
    for message in reversed(entry.messages):
        if message.role == "user":
            return " ".join(p.text if isinstance(p, JobText) else "[image]" for p in message.content)
    return ""


def _original_reply(entry: FeedbackEntry) -> str | None:
    last = entry.messages[-1] if entry.messages else None
    if last is None or last.role != "assistant":
        return None
    return "".join(p.text for p in last.content if isinstance(p, JobText))


def generate_once(controller: ControllerClient, body: GenerateRequest, row: ReplayRow) -> ReplayRow:
    """Stream one generation through `POST /api/v1/generate`, filling the row's reply or error."""
    text = ""
    for event in controller.generate(body):
        row.job_id = event.job_id
        if isinstance(event, TokenEvent):
            text += event.text
        elif isinstance(event, DoneEvent):
            row.replay = event.text or text
            row.finish_reason = event.finish_reason
            row.prompt_tokens = event.usage.prompt_tokens
            row.completion_tokens = event.usage.completion_tokens
            return row
        elif isinstance(event, ErrorEvent):
            row.replay = event.text or text
            row.finish_reason = FinishReason.error
            row.error = f"{event.code}: {event.message}"
            return row
    row.replay, row.error = text, "stream ended without a final event"
    return row


def replay_entry(
    redis: Any, controller: ControllerClient, entry: FeedbackEntry, model: str, *, greedy: bool
) -> ReplayRow:
    row = ReplayRow(
        entry_id=entry.entry_id or "",
        feedback_type=entry.type,
        reason=entry.reason,
        original_model=entry.model,
        model=model,
        prompt=_last_user_text(entry),
        images=entry.images,
        original=_original_reply(entry),
    )
    try:
        body = feedback_generate_request(redis, entry)
    except LlavaError as exc:  # an image no longer stored
        row.error = f"{exc.code}: {exc.message}"
        return row
    body.model = model
    if greedy:
        body.temperature = 0.0
    try:
        return generate_once(controller, body, row)
    except ControllerUnreachable as exc:
        if isinstance(exc.__cause__, httpx.ConnectError):
            raise  # the controller is not there: stop, rather than fill a report with the same error
        row.error = f"http_error: {type(exc.__cause__).__name__}: {exc.__cause__}"
        return row
    except LlavaError as exc:  # refused before the stream started (unknown model, queue full, ...)
        row.error = f"{exc.code}: {exc.message}"
        return row


# ---- Report -------------------------------------------------------------------------------------------------


def _md_cell(text: str | None) -> str:
    if text is None:
        return "—"
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or " "


def markdown_table(rows: list[ReplayRow]) -> str:
    lines = [
        "# llava-serve replay",
        "",
        "| # | entry | type | reason | prompt | original | model | replay |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, start=1):
        new = r.replay + (f" **[{r.error}]**" if r.error else "")
        cells = [
            str(i),
            r.entry_id,
            r.feedback_type.value,
            _md_cell(r.reason),
            _md_cell(r.prompt),
            f"{_md_cell(r.original)} *({_md_cell(r.original_model)})*",
            _md_cell(r.model),
            _md_cell(new),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def html_table(rows: list[ReplayRow]) -> str:
    def cell(text: str | None) -> str:
        return "<td>" + ("—" if text is None else html.escape(text).replace("\n", "<br>")) + "</td>"

    body = []
    for i, r in enumerate(rows, start=1):
        new = html.escape(r.replay).replace("\n", "<br>")
        if r.error:
            new += f' <strong class="error">[{html.escape(r.error)}]</strong>'
        body.append(
            "<tr>"
            + "".join(cell(v) for v in (str(i), r.entry_id, r.feedback_type.value, r.reason, r.prompt))
            + cell(r.original)[:-5]
            + f" <em>({html.escape(r.original_model)})</em></td>"
            + cell(r.model)
            + f"<td>{new}</td></tr>"
        )
    return (
        '<!doctype html>\n<html><head><meta charset="utf-8"><title>llava-serve replay</title>\n'
        "<style>table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px;vertical-align:top}"
        ".error{color:#b00}</style></head><body>\n<h1>llava-serve replay</h1>\n<table>\n"
        "<tr><th>#</th><th>entry</th><th>type</th><th>reason</th><th>prompt</th><th>original</th><th>model</th>"
        "<th>replay</th></tr>\n" + "\n".join(body) + "\n</table></body></html>\n"
    )


def write_report(rows: list[ReplayRow], out_dir: Path, fmt: Literal["md", "html"]) -> tuple[Path, Path]:
    """`replay.jsonl` and `replay.md` (or `.html`) in `out_dir`; the same rows give the same bytes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / f"{REPORT_NAME}.jsonl"
    jsonl.write_text("".join(r.model_dump_json(exclude={"job_id"}) + "\n" for r in rows), encoding="utf-8")
    table = out_dir / f"{REPORT_NAME}.{fmt}"
    table.write_text(markdown_table(rows) if fmt == "md" else html_table(rows), encoding="utf-8")
    return jsonl, table


def record_rows(redis: Any, run_id: str, rows: list[ReplayRow]) -> None:
    """Append the rows (job ids included) to `keys.replays()`, in one pipeline."""
    if not rows:
        return
    with redis.pipeline(transaction=False) as pipe:
        for row in rows:
            fields = {"run_id": run_id, ROW_FIELD: row.model_dump_json()}
            pipe.xadd(keys.replays(), fields, maxlen=keys.REPLAYS_MAXLEN, approximate=True)
        pipe.execute()


def run_replay(
    redis: Any,
    controller: ControllerClient,
    selection: ReplaySelection,
    model: str,
    out_dir: Path,
    *,
    fmt: Literal["md", "html"] = "md",
    greedy: bool = True,
    progress: bool = True,
) -> ReplayReport:
    """Replay every selected entry against `model`, one at a time, then write the report and the stream."""
    from tqdm import tqdm

    entries = select_entries(redis, selection)
    rows = []
    for entry in tqdm(entries, desc=f"replay on {model}", unit="conv", disable=not progress, file=sys.stderr):
        rows.append(replay_entry(redis, controller, entry, model, greedy=greedy))
    run_id = uuid.uuid4().hex
    jsonl, table = write_report(rows, out_dir, fmt)
    record_rows(redis, run_id, rows)
    return ReplayReport(run_id=run_id, rows=rows, jsonl_path=jsonl, table_path=table)


# ---- `llava-serve replay` -----------------------------------------------------------------------------------


def parse_time(value: str) -> float:
    """Unix seconds, or an ISO 8601 date/time (UTC unless it says otherwise)."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is neither Unix seconds nor an ISO 8601 time") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the model to replay the conversations against")
    parser.add_argument(
        "--type",
        dest="types",
        action="append",
        choices=[t.value for t in FeedbackType],
        help="feedback type to select; repeat for several (default: flag)",
    )
    parser.add_argument("--include-votes", action="store_true", help="also select upvotes and downvotes")
    parser.add_argument(
        "--from-model", dest="from_models", action="append", default=[], help="only entries judged on this model"
    )
    parser.add_argument("--since", type=parse_time, help="entries at or after this time (ISO 8601 or Unix seconds)")
    parser.add_argument("--until", type=parse_time, help="entries at or before this time")
    parser.add_argument("--count", type=int, help="at most this many entries, oldest first")
    parser.add_argument("--out", default="replay-report", help="directory for replay.jsonl and the table")
    parser.add_argument("--format", choices=["md", "html"], default="md", help="table format (default md)")
    parser.add_argument("--keep-sampling", action="store_true", help="use each entry's sampling, not greedy")
    parser.add_argument("--controller-url", default=None, help="controller base URL (default http://127.0.0.1:10000)")
    parser.add_argument("--api-key", default=None, help="bearer key for the controller (env LLAVA_API_KEY)")
    parser.add_argument("--redis-url", default=None, help="Redis URL to read the feedback from (env LLAVA_REDIS_URL)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one generation may take (default 600)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def selection_from_args(args: argparse.Namespace) -> ReplaySelection:
    types = {FeedbackType(t) for t in (args.types or [FeedbackType.flag.value])}
    if args.include_votes:
        types |= _VOTES
    return ReplaySelection(
        types=types, models=set(args.from_models), since=args.since, until=args.until, count=args.count
    )


def run_replay_command(args: argparse.Namespace, *, http: httpx.Client | None = None) -> int:
    """Exit 0 when every entry replayed, 1 when some ended in an error, 2 when Redis or the controller is down.
    `http` (a test client) replaces the connection to `--controller-url`."""
    import redis as redis_errors

    from infra.redis import connect
    from infra.settings import CONTROLLER_PORT

    client = connect(args.redis_url or os.environ.get("LLAVA_REDIS_URL"))
    controller = ControllerClient(
        args.controller_url or f"http://127.0.0.1:{CONTROLLER_PORT}",
        api_key=args.api_key or os.environ.get("LLAVA_API_KEY"),
        timeout=httpx.Timeout(args.timeout, connect=5.0),
        user_agent="llava-serve-replay",
        http=http,
    )
    try:
        report = run_replay(
            client,
            controller,
            selection_from_args(args),
            args.model,
            Path(args.out),
            fmt=args.format,
            greedy=not args.keep_sampling,
            progress=not args.no_progress,
        )
    except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
        print(f"llava-serve replay: cannot reach Redis ({exc})", file=sys.stderr)
        return 2
    except ControllerUnreachable as exc:
        print(f"llava-serve replay: {exc.message}", file=sys.stderr)
        return 2
    finally:
        controller.close()
        client.close()
    failed = sum(1 for r in report.rows if r.error)
    print(
        f"replayed {len(report.rows)} conversation(s) on {args.model}: {failed} error(s); "
        f"report in {report.jsonl_path} and {report.table_path} (run {report.run_id} in {keys.replays()})"
    )
    return 1 if failed else 0
