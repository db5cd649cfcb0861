"""elric: a distributed job scheduler. Subclass Job, run a master and workers."""

from elric.client import MasterClient
from elric.contract import SpecError
from elric.handle import JobFailed, JobHandle
from elric.job import Job
from elric.triggers import at, cron, every

__all__ = ["Job", "JobFailed", "JobHandle", "MasterClient", "SpecError", "at", "cron",
           "every"]
__version__ = "0.1.0"
