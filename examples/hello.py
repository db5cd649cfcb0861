"""The smallest job: add two numbers.

    elric worker examples.hello &     # from this repository's folder; a master running
    python -c "from examples.hello import Add; print(Add.submit(2, 3))"
"""

from elric import Job


class Add(Job):
    def run(self, a, b):
        return a + b
