"""Run a worker: the same as `elric worker` (try --help)."""
import sys

from elric.cli import main

if __name__ == "__main__":
    sys.exit(main(["worker", *sys.argv[1:]]))
