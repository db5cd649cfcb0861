"""Every Redis key elric uses, built in one place.

All keys live under one prefix (setting ``KEY_PREFIX``, default ``elric``) so that an
operator can inspect the whole state with ``redis-cli --scan --pattern 'elric:*'``.

Jobs and queues
    ``{p}:job:{job_id}``            hash   one job: spec fields, status, result, timings.
                                           Ended jobs expire: succeeded after ``RESULT_TTL``,
                                           failed or cancelled after ``FAILED_TTL``.
    ``{p}:queue:{queue}``           zset   jobs ready to run. score = -priority,
                                           member = ``{seq:016x}:{job_id}`` so equal
                                           priorities pop in submission order (FIFO).
    ``{p}:queues``                  set    names of the queues used; one holding no job
                                           leaves, with its counters and wake list, the
                                           longer of RESULT_TTL and FAILED_TTL after
                                           its last activity.
    ``{p}:data_since``              string when (ms, Redis's clock) a master first found
                                           no such key: one gone later means Redis lost
                                           its data, which that master then says.
    ``{p}:data_epoch``              string counter each master raises every pass; one
                                           below what it last wrote means Redis went back
                                           to older data, which that master then says.
    ``{p}:seq``                     string counter behind the FIFO sequence numbers and
                                           periodic jobs' versions (never reused).
    ``{p}:wake:{queue}``            list   wake-up tokens; idle workers BLPOP on them.
    ``{p}:inflight``                zset   job_id -> lease deadline (ms since epoch) of
                                           jobs claimed by a worker.
    ``{p}:delayed``                 zset   job_id -> time (ms) a retrying job is due again.
    ``{p}:status:{status}``         zset   job_id -> time (ms) it entered that status;
                                           the index behind ``list_jobs`` and ``stats``.
                                           Not for ``queued``: a queued job's index is
                                           its queue's zset.
    ``{p}:stats:counters``          hash   cumulative counters (``submitted``,
                                           ``succeeded``, ``failed``, ...); per queue
                                           ``queue:{queue}:{event}`` and ``last_at``
                                           (ms: a job submitted or recorded).
    ``{p}:stats:batch:{batch}``     hash   one batch label: counters named after the
                                           status a job reached (``submitted``,
                                           ``succeeded``, ``failed``, ``retrying``,
                                           ``cancelled``), ``removed`` (a queued or
                                           retrying job deleted: remove.lua),
                                           ``duration_ms`` (summed over recorded
                                           attempts), a histogram of attempt durations
                                           (``le:{ms}`` fields, bounds in
                                           elric/jobstats.py), ``first_at`` (first
                                           submit) and ``last_at`` (last submit or
                                           record), ms on Redis's clock.
    ``{p}:batches``                 set    every batch label used; one whose jobs all ended
                                           leaves, with its hash, the longer of RESULT_TTL
                                           and FAILED_TTL after its ``last_at``.
    ``{p}:stats:func:{func}``       hash   the same fields for one func (a job's
                                           ``func``, e.g. ``examples.crawler:Page``).
    ``{p}:funcs``                   set    every func submitted; one leaves as a batch
                                           label does.
    ``{p}:stats:minute:{minute}``   hash   attempts recorded in that minute (epoch
                                           minutes, Redis's clock): ``succeeded``,
                                           ``failed``, ``retrying``. Expires after a day.
    ``{p}:round:{round}``           hash   a crawl round (a periodic fire and every job
                                           descending from it): submitted, succeeded,
                                           failed, removed. Expires FAILED_TTL after its
                                           last change.

Per-key limits (a job's ``limit_key``: e.g. a crawled host)
    ``{p}:limits``                  hash   limit key (or ``*``) -> "concurrency,interval_ms"
                                           (either may be empty), from setting LIMITS.
    ``{p}:limit:running:{key}``     set    ids of the jobs of that key claimed by workers.
    ``{p}:limit:next:{key}``        string earliest time (ms, Redis clock) the key's next
                                           job may start; expires then.
    ``{p}:limit:hold:{key}``        string the same, set by a failed run whose server asked
                                           to wait (Retry-After), whatever the key's rule.
    ``{p}:limit:parked:{key}``      zset   that key's queued jobs that met its limit, moved
                                           out of their queue so jobs of other keys pass
                                           (score and member as in the queue).
    ``{p}:limits:due``              zset   key with parked jobs -> when (ms) they are looked
                                           at again.
    ``{p}:limits:parked``           hash   queue -> how many of its jobs are parked.

Workers
    ``{p}:workers``                 zset   worker_id -> last heartbeat (ms).
    ``{p}:worker:{worker_id}``      hash   host, pid, queues, concurrency, counters,
                                           trouble (what its work is stuck on).
    ``{p}:worker:{worker_id}:wake`` list   a token that ends the worker's wait for work at
                                           once (paused, new queues, stopping).

Periodic jobs (job store and scheduler)
    ``{p}:schedule:{job_id}``       hash   a periodic job: spec, trigger (msgpack), state.
                                           One with no fire left expires, with its
                                           runs, a day later.
    ``{p}:schedules``               zset   job_id -> next run time (ms); paused jobs
                                           score +inf, so they are listed without a scan.
    ``{p}:schedule_runs:{job_id}``  list   the last runs of a periodic job (capped).
    ``{p}:schedule_rounds_left:{job_id}`` string its recent rounds (msgpack fire ids),
                                           left by its removal for a job added again
                                           under the id to count (max_instances); expires.
    ``{p}:fire:{fire_id}``          string set once (SET NX) per fire: a fire is
                                           enqueued at most once.
    ``{p}:fires:pending``           hash   fire_id -> spec (msgpack) of a fire marked and
                                           not yet queued; a new leader queues these first.
    ``{p}:stats:fires``             hash   fires fired, missed and skipped, and the summed
                                           lateness (ms) of those fired.
    ``{p}:scheduler:lease``         string the id of the master that schedules now.
    ``{p}:scheduler:fence``         string counter; a fencing token per lease taken.
                                           One INCR fails on (an operator's write) is
                                           replaced by Redis's clock in microseconds.
    ``{p}:scheduler:wake``          list   tokens that wake the scheduling master early
                                           (a sooner job arrived on any master).

Dedupe filters
    ``{p}:dedupe:set:{scope}``          set    exact filter of one scope (a zset of key ->
                                               time seen when DEDUPE_TTL is set).
    ``{p}:dedupe:bloom:{scope}``        string snapshot of an in-master Bloom filter.
    ``{p}:dedupe:rbloom:{scope}:{n}``   string shard ``n`` of a Bloom filter kept in Redis:
                                               the Bloom bits, then a zero byte
                                               (layout in elric/rbloom.py).
    ``{p}:dedupe:taking:{n}:{scope}{key}`` string the job a filter let ``key``
                                               through for (``n``: the scope's length in
                                               bytes), until the job is queued or the key
                                               given back; expires.
    ``{p}:dedupe:stats:{scope}``        hash   items added, filtered, params, backend,
                                               per scope.
    ``{p}:dedupe:scopes``               zset   every scope with a stats hash -> when it
                                               expires (ms; +inf but for DEDUPE_TTL set
                                               scopes): written with the hash, in the same
                                               call, so stats() needs no SCAN.
    ``{p}:dedupe:rounds``               zset   per-fire scope -> time (ms) it began; the
                                               master drops scopes older than
                                               DEDUPE_ROUND_TTL.
"""

from __future__ import annotations


def _family(pattern: str):
    """A Keys method: ``pattern`` (after the prefix) with the method's arguments put in."""
    def key(self, *ids) -> str:
        return f"{self.prefix}:{pattern.format(*ids)}"
    return key


class Keys:
    """Builds key names under one prefix. A method called with "" gives the prefix of that
    family of keys, which scripts append the ids they read to."""

    def __init__(self, prefix: str = "elric") -> None:
        if not prefix or any(c.isspace() for c in prefix):
            raise ValueError(f"KEY_PREFIX must be a non-empty word, got {prefix!r}")
        self.prefix = prefix
        p = prefix
        self.queues = f"{p}:queues"
        self.seq = f"{p}:seq"
        self.data_since = f"{p}:data_since"
        self.data_epoch = f"{p}:data_epoch"
        self.inflight = f"{p}:inflight"
        self.delayed = f"{p}:delayed"
        self.counters = f"{p}:stats:counters"
        self.batches = f"{p}:batches"
        self.funcs = f"{p}:funcs"
        self.workers = f"{p}:workers"
        self.schedules = f"{p}:schedules"
        self.scheduler_lease = f"{p}:scheduler:lease"
        self.scheduler_fence = f"{p}:scheduler:fence"
        self.scheduler_wake = f"{p}:scheduler:wake"
        self.fires_pending = f"{p}:fires:pending"
        self.fire_stats = f"{p}:stats:fires"
        self.dedupe_rounds = f"{p}:dedupe:rounds"
        self.dedupe_scopes = f"{p}:dedupe:scopes"
        self.limits = f"{p}:limits"
        self.limits_due = f"{p}:limits:due"
        self.limits_parked = f"{p}:limits:parked"

    # jobs and queues
    job = _family("job:{}")
    queue = _family("queue:{}")
    wake = _family("wake:{}")
    status = _family("status:{}")
    batch = _family("stats:batch:{}")
    func = _family("stats:func:{}")
    minute = _family("stats:minute:{}")
    round = _family("round:{}")
    # per-key limits
    limit_running = _family("limit:running:{}")
    limit_next = _family("limit:next:{}")
    limit_hold = _family("limit:hold:{}")
    limit_parked = _family("limit:parked:{}")
    # workers
    worker = _family("worker:{}")
    worker_wake = _family("worker:{}:wake")
    # periodic jobs
    schedule = _family("schedule:{}")
    # (not schedule:{}:runs: an id may hold ":", and "X:runs" is a periodic job's id too)
    schedule_runs = _family("schedule_runs:{}")
    schedule_rounds_left = _family("schedule_rounds_left:{}")
    fire = _family("fire:{}")
    # dedupe
    dedupe_set = _family("dedupe:set:{}")
    dedupe_bloom = _family("dedupe:bloom:{}")
    dedupe_rbloom = _family("dedupe:rbloom:{}:{}")
    dedupe_taking = _family("dedupe:taking:{}")
    dedupe_stats = _family("dedupe:stats:{}")

    @staticmethod
    def taker_note(scope: str, key: str) -> str:
        """What follows ``dedupe_taking("")`` for ``key`` in ``scope`` (as Lua builds it)."""
        return f"{len(scope.encode())}:{scope}{key}"
