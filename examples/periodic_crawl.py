"""Crawl a site every 15 minutes: each round fetches every page once.

    elric worker elric.demo.crawler --queues crawl &   # the module its jobs name
    python -m examples.periodic_crawl http://127.0.0.1:8000/

Running this script again replaces the schedule (same job_id) instead of adding a copy.
``dedupe_scope="@fire"`` gives every round a fresh dedupe scope, which the pages it finds
inherit: a page is fetched once per round, and again the next round.
"""

import sys

from elric.triggers import every
from examples.crawler import Crawl


def schedule(url: str, *, minutes: float = 15, seconds: float | None = None,
             job_id: str = "site") -> str:
    """Crawl ``url`` every ``minutes`` (or every ``seconds``, when given)."""
    interval = {"seconds": seconds} if seconds else {"minutes": minutes}
    return Crawl.submit_with(args=[url], job_id=job_id, trigger=every(**interval),
                             replace_existing=True, dedupe_scope="@fire")


if __name__ == "__main__":
    print(schedule(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/"))
