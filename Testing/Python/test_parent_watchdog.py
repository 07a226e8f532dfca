"""The "stop if Slicer dies" watchdog (--parent-pid, issue 11 item 5): a job exits once the process that
started it is gone, the existence check is portable (no signal 0 on Windows), and an unexpected error in
the check does not kill the watchdog thread."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from MedSSL.commands.common import process_exists, watch_parent

ROOT = Path(__file__).resolve().parents[2]


def test_process_exists():
    assert process_exists(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not process_exists(child.pid)


def test_job_exits_when_its_parent_dies(tmp_path):
    """parent -> job (watching the parent with --parent-pid's watchdog); the parent dies; the job ends."""
    pidfile = tmp_path / "job.pid"
    job = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from MedSSL.commands.common import watch_parent
        watch_parent(int(sys.argv[1]), interval=0.1)
        open({str(pidfile)!r}, "w").write(str(os.getpid()))
        time.sleep(60)
    """)
    parent = textwrap.dedent(f"""
        import os, subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", {job!r}, str(os.getpid())], start_new_session=True)
        while not os.path.exists({str(pidfile)!r}):
            time.sleep(0.05)
        os._exit(0)   # Slicer crashes
    """)
    subprocess.run([sys.executable, "-c", parent], timeout=60, check=True)
    jobPid = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while process_exists(jobPid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_exists(jobPid), "the job outlived its parent"


def test_watchdog_survives_a_failing_check(tmp_path):
    """A check that raises (as os.kill(pid, 0) did on Windows) is retried; the job still exits once the
    parent is gone."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from MedSSL.commands.common import watch_parent
        calls = []
        def exists(pid):
            calls.append(pid)
            if len(calls) < 4:
                raise OSError(22, "Invalid argument")  # what Windows gave for signal 0
            return len(calls) < 6
        watch_parent(123456, interval=0.05, exists=exists)
        time.sleep(30)
        sys.exit(0)
    """)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], timeout=60)
    assert result.returncode == 3 and time.monotonic() - started < 20
    assert callable(watch_parent)
