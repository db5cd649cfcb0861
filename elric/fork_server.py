"""What the worker's fork server imports first (Pool's preload), never the worker itself.

The fork server, and each pool process it forks until ``runner.serve`` sets a handler of
its own, ignores SIGTERM: a SIGTERM sent to the worker's whole process group (systemd,
docker, ``kill -- -PGID``) then stops only the worker, which lets running jobs finish (a
dead fork server would take its pool processes' exit notices with it). The worker never
ignores SIGTERM itself, even for a moment: one that came then was lost.
"""

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
