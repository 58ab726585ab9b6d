"""Every Redis key and channel name llava-serve uses, under one prefix.

No other module writes a key literal. rq owns its own keys (`rq:queue:<name>`, `rq:job:<id>`, registries);
the only rq name chosen here is the queue name of a model, and the `rq_*` functions spell rq's keys in one place
(tests check them against rq's own classes).
"""

from __future__ import annotations

PREFIX = "llava:"

# Liveness: a worker key lives WORKER_TTL_S seconds past the worker's last heartbeat, written every
# HEARTBEAT_INTERVAL_S from a thread of its own: six beats may be missed (a loaded host) before it expires.
WORKER_TTL_S = 3
HEARTBEAT_INTERVAL_S = 0.5
# The per-worker job table outlives the worker key long enough for a sweeper to act on it.
WORKER_JOBS_TTL_S = 24 * 3600
CANCEL_TTL_S = 600
# Long enough to outlast any retry of the command that set it (redis-py's own resends, an outage ridden out).
CHARGED_TTL_S = 600
IMAGE_TTL_S = 3600
SWEEP_LOCK_TTL_MS = 1500
# A controller process refreshes its lease every CONTROLLER_LEASE_INTERVAL_S; once the lease is gone (TTL
# CONTROLLER_LEASE_TTL_S), workers cancel that controller's jobs: nobody is left to read them.
CONTROLLER_LEASE_TTL_S = 5
CONTROLLER_LEASE_INTERVAL_S = 1.0


def worker(worker_id: str) -> str:
    """STRING, JSON `WorkerInfo`; TTL WORKER_TTL_S, refreshed by the worker's heartbeat thread."""
    return f"{PREFIX}worker:{worker_id}"


def workers() -> str:
    """SET of worker ids that registered; the sweeper removes ids whose `worker()` key expired. No TTL."""
    return f"{PREFIX}workers"


def worker_jobs(worker_id: str) -> str:
    """HASH job id -> `ClaimState` of the jobs a worker holds; TTL WORKER_JOBS_TTL_S, refreshed by heartbeat. A
    worker owns a job while its id is here (a sweeper removes it): its writes for the job check this atomically."""
    return f"{PREFIX}worker:{worker_id}:jobs"


def worker_inbox(worker_id: str) -> str:
    """LIST a worker's blocking claim (BLMOVE) lands a job id in before it enters `worker_jobs()`; the sweeper
    treats ids left here as claimed. No TTL: emptied at once by the claim that filled it."""
    return f"{PREFIX}worker:{worker_id}:inbox"


def controller(controller_id: str) -> str:
    """STRING, the lease of one controller process (its host and pid, for operators); TTL CONTROLLER_LEASE_TTL_S,
    refreshed every CONTROLLER_LEASE_INTERVAL_S by that process and deleted when it stops."""
    return f"{PREFIX}controller:{controller_id}"


def queue_name(model: str) -> str:
    """rq queue name of a model; rq stores the queue as LIST `rq:queue:<name>`."""
    return f"{PREFIX}{model}"


def model_from_queue_name(name: str) -> str:
    """Inverse of `queue_name()`."""
    return name[len(PREFIX) :]


RQ_PREFIX = "rq:"


def rq_queue(model: str) -> str:
    """LIST rq keeps a model's queue in (job ids, oldest first). No TTL; rq removes it when empty."""
    return f"{RQ_PREFIX}queue:{queue_name(model)}"


def rq_queue_prefix() -> str:
    """The start of every `rq_queue()` key; what follows it is the model name."""
    return rq_queue("")


def rq_queues() -> str:
    """SET of every rq queue key that has had a job (rq's `Queue.redis_queues_keys`). No TTL."""
    return f"{RQ_PREFIX}queues"


def rq_job(job_id: str) -> str:
    """HASH, rq's record of one job; no TTL while queued or running, result/failure TTL once ended."""
    return f"{RQ_PREFIX}job:{job_id}"


def rq_registry(kind: str, model: str) -> str:
    """ZSET, one of rq's registries of a model's queue, named by rq's key word `kind`: `wip` (started), `finished`,
    `failed`, `canceled`; scores are expiry times. No TTL."""
    return f"{RQ_PREFIX}{kind}:{queue_name(model)}"


def rq_results(job_id: str) -> str:
    """STREAM of rq's result entries of one job; TTL the job's result or failure TTL."""
    return f"{RQ_PREFIX}results:{job_id}"


def chunks(job_id: str) -> str:
    """Pub/sub channel of a job's stream events (`StreamEvent`). Keeps nothing."""
    return f"{PREFIX}job:{job_id}:chunks"


def chunks_pattern() -> str:
    """Pattern matching every job's chunk channel (to watch with redis-cli; controllers subscribe per job)."""
    return f"{PREFIX}job:*:chunks"


def cancel(job_id: str) -> str:
    """STRING "1" set when a job's client went away or asked to stop; TTL CANCEL_TTL_S."""
    return f"{PREFIX}job:{job_id}:cancel"


def charged(job_id: str, kind: str) -> str:
    """STRING "1": the job's rate charge `kind` (`admit` or `debit`) was applied, so that the same command sent
    again after its reply was lost is not applied twice; TTL CHARGED_TTL_S, set in the script that charges."""
    return f"{PREFIX}job:{job_id}:charged:{kind}"


def image(digest: str) -> str:
    """STRING, the bytes of one uploaded image, named by its sha256; TTL IMAGE_TTL_S, raised to the feedback
    retention once a feedback entry keeps it (no TTL when that retention is unset) and to the conversation log's
    retention once the log keeps it; never lowered."""
    return f"{PREFIX}image:{digest}"


def feedback() -> str:
    """STREAM of votes and flags (`FeedbackEntry` in field `entry`). No TTL; each XADD trims it exactly to the
    feedback retention: MINID now - `feedback_retention_days` (365), MAXLEN `feedback_retention_entries` (100,000)."""
    return f"{PREFIX}feedback"


def sweep_lock() -> str:
    """STRING held by the controller replica that sweeps dead workers; TTL SWEEP_LOCK_TTL_MS."""
    return f"{PREFIX}sweeper:lock"


STATS_TTL_S = 2 * 3600
REPLAYS_MAXLEN = 100_000


def stats_minute(minute: int) -> str:
    """HASH of counters for one wall-clock minute (`minute` = Unix time // 60), fields `<model>|<counter>`
    (`requests`, `errors`, `prompt_tokens`, `completion_tokens`), HINCRBY'd once per finished job in one
    pipelined write; TTL STATS_TTL_S, set in the same pipeline."""
    return f"{PREFIX}stats:{minute}"


def replays() -> str:
    """STREAM of `llava-serve replay` results (`ReplayRow` JSON in field `row`, plus `run_id`), capped near
    REPLAYS_MAXLEN entries. No TTL."""
    return f"{PREFIX}replays"


def client_jobs(client: str) -> str:
    """ZSET of the jobs one client (`key-<digest>` or its address) holds queued or running, scored by the Unix time
    in ms each entry lapses (a controller that died before releasing it cannot hold the slot longer); PEXPIRE the
    longest hold, renewed at each admission."""
    return f"{PREFIX}client:{client}:jobs"


def rate_bucket(client: str, kind: str) -> str:
    """HASH `level`, `at` (ms) of one client's token bucket, `kind` `requests` or `tokens` (per minute); PEXPIRE
    the time it takes to refill, set in the same script that writes it."""
    return f"{PREFIX}client:{client}:rate:{kind}"


def conversations() -> str:
    """STREAM of finished, failed and cancelled exchanges (`ConversationRecord` JSON in field `record`), written only
    with `--log-conversations`; capped at each XADD by MINID ~ (retention days) and/or MAXLEN ~ (retention entries).
    No TTL. Its images' TTLs are extended to the retention days."""
    return f"{PREFIX}conversations"


def refusals() -> str:
    """HASH of requests refused, by error code (`rate_limited`, `content_refused`, and `reply_flagged` for a reply
    stopped as it streamed), summed over
    every replica since Redis began (HINCRBY). No TTL; a handful of fields."""
    return f"{PREFIX}refusals"
