"""A small demo site served on 127.0.0.1, for the crawler demo and its tests.

The code lives in ``elric.demo.site`` so that ``elric demo`` works after ``pip install``.
"""

from elric.demo.site import DemoSite

__all__ = ["DemoSite"]
