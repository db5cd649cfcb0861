"""The master: the RPC front door, and the housekeeping that keeps jobs moving.

It validates job specs against the wire contract, queues them through RedisQueue, answers
queries, and in the background gives the jobs of dead workers back to the queue and puts
retrying jobs back in line when their backoff is over. Any number of masters may run
against one Redis: every state change they make is an atomic script.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import uuid

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from elric import contract
from elric.config import Settings, SettingsError
from elric.contract import SpecError
from elric.keys import Keys
from elric.queue import RedisQueue
from elric.rpc import RequestError, Server

log = logging.getLogger("elric.master")

REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
MAX_BATCH = 10_000
MAX_PAGE = 1000


class Master:
    def __init__(self, settings: Settings, *, address: str | None = None) -> None:
        self.settings = settings
        self.address = address or settings.MASTER_ADDRESS
        self.keys = Keys(settings.KEY_PREFIX)
        self.master_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.defaults = {"max_retries": settings.MAX_RETRIES, "timeout": settings.JOB_TIMEOUT}
        self._stop = asyncio.Event()
        self.server: Server | None = None

    # --- lifecycle --------------------------------------------------------------------
    async def start(self) -> tuple[str, int]:
        s = self.settings
        self.redis = aioredis.Redis.from_url(s.REDIS_URL, socket_connect_timeout=5)
        try:
            await self.redis.ping()
        except Exception as exc:
            raise SettingsError(f"REDIS_URL {s.REDIS_URL}: cannot connect ({exc})") from None
        self.queue = RedisQueue(self.redis, self.keys, result_ttl=s.RESULT_TTL,
                                failed_ttl=s.FAILED_TTL)
        from elric.config import parse_address

        host, port = parse_address(self.address, "MASTER_ADDRESS")
        if host not in ("127.0.0.1", "localhost", "::1") and not s.RPC_TOKEN:
            log.warning("!!! master listens on %s without RPC_TOKEN: anyone who can reach this "
                        "port can submit jobs. Set RPC_TOKEN. !!!", self.address)
        self.server = Server(self.handlers(), token=s.RPC_TOKEN, max_message=s.RPC_MAX_MESSAGE)
        try:
            bound = await self.server.start(host, port)
        except OSError as exc:
            raise SettingsError(f"MASTER_ADDRESS {self.address}: cannot listen "
                                f"({exc.strerror or exc})") from None
        self._housekeeping = asyncio.create_task(self._housekeeping_loop())
        log.info("master %s listening on %s:%d", self.master_id, *bound[:2])
        return bound

    async def run(self) -> int:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        await self._stop.wait()
        await self.close()
        return 0

    async def close(self) -> None:
        log.info("master %s stopping", self.master_id)
        if self.server is not None:
            await self.server.close()
        self._housekeeping.cancel()
        await self.redis.aclose()

    async def _housekeeping_loop(self) -> None:
        """Redeliver the jobs of dead workers; queue retries whose backoff is over."""
        backoff = 0.5
        while True:
            try:
                recovered = await self.queue.recover()
                if recovered:
                    log.warning("redelivered %d job(s) whose worker stopped renewing its lease",
                                len(recovered))
                await self.queue.promote()
                due = await self.queue.next_delayed()
                backoff = 0.5
                await asyncio.sleep(min(1.0, due if due is not None else 1.0))
            except asyncio.CancelledError:
                raise
            except REDIS_ERRORS as exc:
                log.warning("master: Redis unreachable (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    # --- RPC API ----------------------------------------------------------------------
    def handlers(self) -> dict:
        return {
            "ping": self.ping,
            "submit_job": self.submit_job,
            "submit_jobs": self.submit_jobs,
            "get_job": self.get_job,
            "remove_job": self.remove_job,
            "list_jobs": self.list_jobs,
            "stats": self.stats,
            "rerun_job": self.rerun_job,
        }

    async def ping(self) -> str:
        return "pong"

    def _normalize(self, spec, where: str = "") -> dict:
        try:
            return contract.normalize_spec(spec, defaults=self.defaults,
                                           allowed_modules=self.settings.JOB_MODULES)
        except SpecError as exc:
            raise RequestError(f"{where}{exc}") from None

    async def _redis_call(self, coro):
        try:
            return await coro
        except REDIS_ERRORS as exc:
            raise RequestError(f"master cannot reach Redis right now ({exc}); "
                               "nothing was changed, try again") from None

    async def submit_job(self, spec) -> dict:
        if not isinstance(spec, dict):
            raise RequestError(f"submit_job takes a job spec map, got {type(spec).__name__}")
        return (await self.submit_jobs([spec]))[0]

    async def submit_jobs(self, specs) -> list[dict]:
        if not isinstance(specs, list):
            raise RequestError(f"submit_jobs takes an array of job specs, got "
                               f"{type(specs).__name__}")
        if len(specs) > MAX_BATCH:
            raise RequestError(f"submit_jobs: {len(specs)} specs in one call; at most "
                               f"{MAX_BATCH}")
        prefix = "" if len(specs) == 1 else "spec {}: "
        normalized = [self._normalize(spec, prefix.format(i)) for i, spec in enumerate(specs)]
        ids = [n["job_id"] for n in normalized]
        if len(set(ids)) != len(ids):
            raise RequestError("submit_jobs: the same job_id appears twice in one batch")
        for n in normalized:
            if "trigger" in n:
                raise RequestError("trigger: periodic jobs are not supported by this master yet")
        return await self._redis_call(self.queue.enqueue(normalized))

    @staticmethod
    def _job_id(job_id) -> str:
        if not isinstance(job_id, str) or not job_id:
            raise RequestError(f"job_id must be a non-empty string, got {job_id!r}")
        return job_id

    async def get_job(self, job_id) -> dict | None:
        return await self._redis_call(self.queue.get_job(self._job_id(job_id)))

    async def remove_job(self, job_id) -> bool:
        return await self._redis_call(self.queue.remove(self._job_id(job_id)))

    async def rerun_job(self, job_id) -> dict:
        try:
            await self._redis_call(self.queue.rerun(self._job_id(job_id)))
        except (LookupError, ValueError) as exc:
            raise RequestError(str(exc)) from None
        return {"job_id": job_id, "status": contract.QUEUED}

    async def list_jobs(self, filter=None) -> list[dict]:
        filter = filter or {}
        if not isinstance(filter, dict):
            raise RequestError(f"list_jobs takes a map filter, got {type(filter).__name__}")
        known = {"status", "queue", "func", "batch", "offset", "limit"}
        unknown = set(filter) - known
        if unknown:
            raise RequestError(f"list_jobs: unknown filter key(s) {sorted(map(str, unknown))}; "
                               f"known: {sorted(known)}")
        status = filter.get("status")
        if status is not None and status not in contract.STATUSES:
            raise RequestError(f"list_jobs: unknown status {status!r}; "
                               f"known: {', '.join(contract.STATUSES)}")
        for key in ("queue", "func", "batch"):
            if filter.get(key) is not None and not isinstance(filter[key], str):
                raise RequestError(f"list_jobs: {key} must be a string")
        offset, limit = filter.get("offset", 0), filter.get("limit", 100)
        if not isinstance(offset, int) or not isinstance(limit, int) or offset < 0 \
                or not 0 < limit <= MAX_PAGE:
            raise RequestError(f"list_jobs: offset must be ≥ 0 and limit 1..{MAX_PAGE}")
        return await self._redis_call(self.queue.list_jobs(
            status=status, queue=filter.get("queue"), func=filter.get("func"),
            batch=filter.get("batch"), offset=offset, limit=limit))

    async def stats(self) -> dict:
        return await self._redis_call(self.queue.stats())
