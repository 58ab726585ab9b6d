"""The conversation log: with `--log-conversations`, every exchange that ends (done, error, or its client gone),
from any endpoint, is appended to `keys.conversations()` as a `ConversationRecord`.

Retention: each append trims entries older than `log_retention_days` (XADD MINID) and beyond
`log_retention_entries` (XTRIM MAXLEN), exactly, so the cost is one evicted entry per append. The images a record
references are kept as long as the record: their TTL is raised to the retention days (never lowered, and an image
kept without TTL by a feedback entry stays so). With a count alone, images are kept DEFAULT_IMAGE_KEEP_S.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from redis import Redis

from contract import keys
from contract.convlog_messages import ConversationRecord
from contract.messages import DoneEvent, ErrorEvent, FinishReason, Timings
from infra.settings import ControllerSettings

if TYPE_CHECKING:
    from broker.admission import AdmittedJob

RECORD_FIELD = "record"
DEFAULT_IMAGE_KEEP_S = 30 * 86400

# Raise each image's TTL to ARGV[1] ms; a key without TTL (kept by feedback) or with a longer one is left alone.
KEEP_IMAGES = """
for _, key in ipairs(KEYS) do
  local ttl = redis.call('PTTL', key)
  if ttl >= 0 and ttl < tonumber(ARGV[1]) then redis.call('PEXPIRE', key, ARGV[1]) end
end
return 0
"""


def build_record(admitted: AdmittedJob, final: DoneEvent | ErrorEvent | None, text: str) -> ConversationRecord:
    """The record of an exchange that ended with `final` (None: its client went away after `text`)."""
    job = admitted.job
    record = ConversationRecord(
        job_id=job.job_id,
        model=job.model,
        endpoint=admitted.endpoint,
        messages=job.messages,
        prompt=job.prompt,
        images=job.images,
        params=job.params,
        reply=text,
        finish_reason=FinishReason.cancelled.value,
        timings=Timings(enqueued_at=job.enqueued_at, finished_at=time.time()),
        api_key_name=admitted.client.key_name,
        client_address=admitted.client.address,
        end_user=admitted.client.end_user,
    )
    if isinstance(final, DoneEvent):
        record.reply = final.text
        record.finish_reason = FinishReason(final.finish_reason).value
        record.usage = final.usage
        worker = final.timings
        record.timings.started_at = worker.started_at
        record.timings.first_token_at = worker.first_token_at
        record.timings.finished_at = worker.finished_at or record.timings.finished_at
    elif isinstance(final, ErrorEvent):
        record.reply = final.text or text
        record.finish_reason = "error"
        record.error_code = final.code
        record.error_message = final.message
    return record


class ConversationLog:
    """Appends records to the log under the retention of `settings`."""

    def __init__(self, redis: Any, settings: ControllerSettings) -> None:
        self.redis = redis  # redis.asyncio.Redis
        self.retention_s = settings.log_retention_days * 86400 if settings.log_retention_days else None
        self.max_entries = settings.log_retention_entries
        self.image_keep_ms = int((self.retention_s or DEFAULT_IMAGE_KEEP_S) * 1000)
        self._keep_images = redis.register_script(KEEP_IMAGES)

    async def write(self, admitted: AdmittedJob, final: DoneEvent | ErrorEvent | None, text: str) -> str:
        """Append the record of one ended exchange and keep its images as long; returns the entry id."""
        record = build_record(admitted, final, text)
        minid = None
        if self.retention_s is not None:
            minid = f"{int((time.time() - self.retention_s) * 1000)}-0"
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(keys.conversations(), {RECORD_FIELD: record.model_dump_json(exclude={"record_id"})}, minid=minid)
            if self.max_entries is not None:
                pipe.xtrim(keys.conversations(), maxlen=self.max_entries, approximate=False)
            results = await pipe.execute()
        if record.images:
            await self._keep_images(keys=[keys.image(d) for d in record.images], args=[self.image_keep_ms])
        entry_id = results[0]
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def read_conversations(redis: Redis, *, start: str = "-", end: str = "+") -> list[ConversationRecord]:
    """Records between stream ids `start` and `end` (`-`/`+`, or ms Unix times), oldest first, `record_id` set."""
    records = []
    for raw_id, fields in redis.xrange(keys.conversations(), min=start, max=end):
        raw = fields.get(RECORD_FIELD.encode()) or fields.get(RECORD_FIELD)
        if raw is None:
            continue
        record = ConversationRecord.model_validate_json(raw)
        record.record_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
        records.append(record)
    return records


def log_size(redis: Redis) -> int:
    """Entries in the conversation log now."""
    return int(redis.xlen(keys.conversations()))
