"""The json-mode relay of a pool process's output (elric.logs.JobOutput), in a process of
its own: it takes over fds 1 and 2."""

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys, threading, types
    from contextvars import ContextVar
    from elric import logs

    current = ContextVar("job", default=None)
    output = logs.JobOutput(current)
    threading.Thread(target=output.relay, daemon=True).start()
    real_format = output.format

    def format_and_warn(record):
        # as a finalizer the GC runs while a record is built does: it writes to stderr
        if record.getMessage() == "first":
            print("from a finalizer", file=sys.stderr)
        return real_format(record)

    output.format = format_and_warn
    current.set(types.SimpleNamespace(job_id="async-1", ended=False))
    print("first")
    print("second")
    sys.stderr.flush()
    output.switch(None)   # what reached the pipes so far is passed on now
    print("done", file=output.stderr, flush=True)
""")


def test_a_write_made_while_a_line_is_passed_on_does_not_hang_the_process(tmp_path):
    # a write to sys.stderr from inside JobOutput.write (a finalizer, a warning) came back
    # to it on the same thread and waited for the lock that thread held: for good
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=30, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines() + proc.stderr.splitlines()
               if line.startswith("{")]
    said = {r["message"]: r.get("job_id") for r in records}
    assert said["first"] == said["second"] == "async-1"
    assert "from a finalizer" in said   # passed on, with no job's id
