"""A crawler: each job fetches one page, extracts its links and submits each as a child job.

Every page of a site is fetched once: a child's job_id is derived from its URL, and the
master ignores a job_id it already holds. Links that leave the start page's host are not
followed.
"""

from __future__ import annotations

import hashlib
import urllib.request
from html.parser import HTMLParser
from urllib.parse import urldefrag, urljoin, urlparse

from elric import Job


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            for name, value in attrs:
                if name == "href" and value:
                    self.links.append(value)


def page_job_id(url: str) -> str:
    return "page-" + hashlib.sha1(url.encode()).hexdigest()[:20]


class Crawl(Job):
    queue = "crawl"
    max_retries = 2
    timeout = 30

    def run(self, url: str, batch: str = "") -> dict:
        with urllib.request.urlopen(url, timeout=10) as response:
            html = response.read().decode("utf-8", "replace")
        parser = _Links()
        parser.feed(html)
        host = urlparse(url).netloc
        found = []
        for href in parser.links:
            link = urldefrag(urljoin(url, href))[0]
            if urlparse(link).netloc != host or link in found:
                continue
            found.append(link)
            options = {"batch": batch} if batch else {}
            Crawl.submit_with(args=[link, batch], job_id=page_job_id(link), **options)
        return {"url": url, "links": len(found), "bytes": len(html)}

    @classmethod
    def start(cls, url: str, batch: str = "") -> str:
        """Submit the first page of a crawl."""
        options = {"batch": batch} if batch else {}
        return cls.submit_with(args=[url, batch], job_id=page_job_id(url), **options)
