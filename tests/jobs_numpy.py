"""A job module that imports numpy.random at import, as one using pandas or scikit-learn
does: the fork server imports it for the pool processes it forks."""

import os

import numpy.random

from elric import Job

first_draw = None   # this process's first number from numpy's global random state


class FirstDraw(Job):
    """Its process's pid and first draw from numpy's global random state."""

    def run(self):
        global first_draw
        if first_draw is None:
            first_draw = int(numpy.random.randint(2**62))
        return [os.getpid(), first_draw]
