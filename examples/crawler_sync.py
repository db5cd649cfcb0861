"""The same crawl as a plain synchronous job (urllib): one page at a time per pool process.

The code lives in ``elric.demo.crawler_sync``; jobs submitted from this import run as
``elric.demo.crawler_sync:CrawlSync``.
"""

from elric.demo.crawler_sync import CrawlSync, normalize_url

__all__ = ["CrawlSync", "normalize_url"]
