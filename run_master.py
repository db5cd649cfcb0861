"""Run a master: the same as `elric master` (try --help)."""
import sys

from elric.cli import main

if __name__ == "__main__":
    sys.exit(main(["master", *sys.argv[1:]]))
