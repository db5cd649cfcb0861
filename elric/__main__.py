import sys

from elric.cli import main

sys.exit(main())
