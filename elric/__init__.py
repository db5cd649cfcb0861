"""elric: a distributed job scheduler. Subclass Job, run a master and workers."""

from elric.client import MasterClient
from elric.contract import SpecError
from elric.job import Job

__all__ = ["Job", "MasterClient", "SpecError"]
__version__ = "0.1.0"
