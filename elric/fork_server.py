"""What the worker's fork server imports first (Pool's preload), never the worker itself.

The fork server and its pool processes (until ``runner.serve`` sets a handler) ignore
SIGTERM: one sent to the worker's process group (systemd, docker) stops only the worker,
which lets running jobs finish. The worker never ignores it, even for a moment: one that
came then would be lost.
"""

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
