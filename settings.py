"""Sample elric settings: every key with its default (a test checks that none is missing).
Copy and edit, or override any key with an environment variable ELRIC_<KEY> (lists:
comma-separated; FILTER_SCOPES: scope=backend,...; LIMITS: JSON). Unknown upper-case names
here, a setting's name in lower case, and unknown ELRIC_ variables are errors, so a typo
cannot silently fall back to a default.
"""

# Redis holding queues, results and the job store. Passwords, ACL users and TLS go in the
# URL: redis://user:password@host:6379/0, rediss://host:6380/0, unix:///path/redis.sock.
REDIS_URL = "redis://127.0.0.1:6379/0"

# Prefix of every Redis key, so several deployments can share one Redis.
KEY_PREFIX = "elric"

# host:port the master listens on, and clients and workers connect to.
MASTER_ADDRESS = "127.0.0.1:7531"

# Shared secret: when set, every RPC connection must authenticate first.
RPC_TOKEN = None

# host:port the master serves the web dashboard and Prometheus /metrics on; None: none.
DASHBOARD_ADDRESS = None

# The dashboard's login; None: RPC_TOKEN. With neither, the dashboard is read-only and
# serves only a loopback address.
DASHBOARD_PASSWORD = None

# Largest RPC message in bytes, either way (at least 64 KiB); a larger request is
# answered too_large and its connection closed.
RPC_MAX_MESSAGE = 8 * 1024 * 1024

# Worker pool processes; None means the machine's CPU count.
CONCURRENCY = None

# Queues a worker pulls from (highest priority first across them).
QUEUES = ["default"]

# Seconds the result of a succeeded job is kept.
RESULT_TTL = 86400

# Largest result a job may return, in bytes (msgpack): a bigger one fails that attempt.
# Store big outputs elsewhere (a file, an object store) and return where they are. None
# means RPC_MAX_MESSAGE / 8 (1 MiB); at most RPC_MAX_MESSAGE / 2.
RESULT_MAX_BYTES = None

# Seconds a failed or cancelled job stays in the failed-jobs registry.
FAILED_TTL = 7 * 86400

# Retries after a failed attempt, unless the job class or the submission says otherwise.
MAX_RETRIES = 0

# First retry delay in seconds; it doubles each retry up to RETRY_BACKOFF_MAX, and each
# delay is jittered to 50-100% of that.
RETRY_BACKOFF = 1.0
RETRY_BACKOFF_MAX = 300.0

# Seconds an attempt may run, unless the job class or the submission says otherwise.
JOB_TIMEOUT = None

# A worker renews the leases of its jobs every second (every LEASE_SECONDS / 3 when that
# is shorter); the jobs of a worker that died are redelivered once its leases run out.
# At least 1 second.
LEASE_SECONDS = 30.0

# A job whose worker is lost while holding it, running or about to (killed, out of memory,
# its host down, cut off), is queued again once the lease runs out, at most this many times (since its submit or
# last rerun); lost once more, it fails: a job that kills or stalls its worker would else
# take down one worker after another, for good. A stopped worker gives its jobs back
# without counting. None: no limit.
MAX_REDELIVERIES = 5

# Seconds running jobs get to finish after a worker is told to stop (SIGTERM, Ctrl-C); a
# second Ctrl-C returns them to the queue at once. A stop takes at most this + 10 s: give a
# supervisor's stop timeout (systemd's TimeoutStopSec, Kubernetes' grace period) that much.
SHUTDOWN_GRACE = 30.0

# Most sync jobs handed to one pool process at once. A chunk holds about 20 ms of work
# (throughput), so jobs that take 20 ms or more go one by one.
WORKER_CHUNK = 64

# Jobs whose run is `async def` run many at once on each pool process's event loop: at most
# this many per process. A crawler's pages wait on the network, not the CPU.
ASYNC_CONCURRENCY = 100

# An async job that blocks its event loop (time.sleep, a sync HTTP call) holds back every
# other job of its process: after this many seconds the worker logs it, naming the job
# (0: never).
LOOP_LAG_WARN = 1.0

# Limits per limit key (a job's limit_key: the crawler's is the page's host), enforced
# across all workers when jobs are fetched. "*" covers every key without its own entry;
# jobs without a limit key are never limited. E.g.
#   {"*": {"concurrency": 8}, "example.com": {"concurrency": 2, "rate": 5}}
# (at most 2 running their code at once, at most 5 starts a second; or "interval": seconds between
# two starts). A job held back waits without using a retry; other keys pass it. A master's
# setting: it publishes the rules to Redis when it starts (restart it after a change).
LIMITS = {}

# The modules your Job classes are in, e.g. ["myproject.jobs"]. A worker imports these at
# start and runs Job classes from them only (`elric worker myproject.jobs` names them
# too); a job naming another module is handed back, never imported. A master refuses
# jobs from other modules at submit, by name (empty: it accepts any).
JOB_MODULES = []

# DEBUG, INFO, WARNING or ERROR. Workers log each job on the logger elric.jobs: started
# (DEBUG), succeeded with its duration (INFO), retried or cancelled (WARNING), failed
# with its traceback (ERROR).
LOG_LEVEL = "INFO"

# "text", or "json": one JSON object per line (time, level, logger, message, and job_id,
# func and attempt for job events); `--log-format` on the command line.
LOG_FORMAT = "text"

# Seconds within which a dead scheduling master is replaced by another (its lease).
SCHEDULER_LEASE = 10.0

# Seconds a master's stop (SIGTERM, Ctrl-C) takes at most, Redis away or not (see its
# doc in elric/config.py); give a supervisor's stop timeout more.
MASTER_STOP_TIMEOUT = 20.0

# Shortest interval trigger accepted, in seconds: a shorter one is refused at submit
# (an interval of 0.001 s would fire as fast as the scheduler can and starve every other
# job).
MIN_INTERVAL = 1.0

# Dedupe filter: "set" (exact, a Redis set per scope), "bloom" (a Bloom filter in one
# master, snapshotted to Redis) or "redis-bloom" (a Bloom filter in Redis, shared by every
# master). FILTER_SCOPES overrides it per scope: {"crawl": "redis-bloom"}; a periodic job's
# id there covers the scopes of its "@fire" rounds. A scope stays with the backend that
# filled it: see docs/DEDUPE.md to switch.
FILTER_BACKEND = "set"
FILTER_SCOPES = {}

# "set" backend: seconds after which a key let through is new again (at most 2**31); None
# keeps keys for good.
DEDUPE_TTL = None

# Give the dedupe key of a job that failed for good back ("set" backend only), so the
# same job can be submitted again. A master's setting: it notes it on each job it queues.
DEDUPE_RELEASE_ON_FAILURE = False

# Seconds the dedupe scope of one fire of a periodic job ("@fire") is kept.
DEDUPE_ROUND_TTL = 86400

# Every backend: seconds after which a key taken for a job that was never
# queued (its call failed, or its master died, and the key stayed taken) goes to the next
# job with it. Keep it well above
# the longest a submit can take (at most 2**31).
DEDUPE_TAKEOVER_AFTER = 600

# Bloom filters: items the first stage holds (each next stage twice as many), and the
# false-positive rate kept overall (a new key wrongly called seen, and its job dropped,
# with this probability), however far a scope grows. A "bloom" scope's snapshot is one
# Redis string (at most 512 MiB): at 0.001 a capacity over ~290 million is refused at start.
BLOOM_CAPACITY = 1_000_000
BLOOM_ERROR_RATE = 0.001

# Seconds between snapshots of the "bloom" backend's filter to Redis (a crash forgets at
# most this much), at least 1; 0: only when the master stops.
BLOOM_SNAPSHOT_INTERVAL = 30.0
