"""The crawler: an async job per page (aiohttp), robots.txt, retries, a size cap, the host
as limit key.

The code lives in ``elric.demo.crawler`` so that ``elric demo`` works after ``pip install``;
read it there. Jobs submitted from this import run as ``elric.demo.crawler:Crawl``.
"""

from elric.demo.crawler import Crawl, normalize_url

__all__ = ["Crawl", "normalize_url"]
