"""The "stop if Slicer dies" watchdog (--parent-pid, issue 11 item 5): a job exits once the process that
started it is gone, the existence check is portable (no signal 0 on Windows), and an unexpected error in
the check does not kill the watchdog thread."""

import os
import select
import subprocess
import sys
import textwrap
from pathlib import Path

from MedSSL.commands.common import process_exists

ROOT = Path(__file__).resolve().parents[2]


def test_process_exists():
    assert process_exists(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not process_exists(child.pid)


def _wait_for_eof(read_end: int) -> bool:
    """True once every write end of the pipe is closed, i.e. every process holding one has exited (an
    event, not a time bound: the 60 s are only there so a broken watchdog fails instead of hanging)."""
    while select.select([read_end], [], [], 60)[0]:
        if not os.read(read_end, 1024):
            return True
    return False


def test_job_exits_when_its_parent_dies(tmp_path):
    """parent -> job (watching the parent with --parent-pid's watchdog); the parent dies; the job ends. The
    job holds the write end of a pipe, so the test sees its exit as end-of-file on the read end."""
    pidfile = tmp_path / "job.pid"
    read_end, write_end = os.pipe()
    job = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from MedSSL.commands.common import watch_parent
        watch_parent(int(sys.argv[1]), interval=0.1)
        open({str(pidfile)!r}, "w").write(str(os.getpid()))
        time.sleep(600)  # only the watchdog ends it in time
    """)
    parent = textwrap.dedent(f"""
        import os, subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", {job!r}, str(os.getpid())], start_new_session=True,
                         pass_fds=({write_end},))
        while not os.path.exists({str(pidfile)!r}):
            time.sleep(0.05)
        os._exit(0)   # Slicer crashes
    """)
    subprocess.run([sys.executable, "-c", parent], timeout=60, check=True, pass_fds=(write_end,))
    os.close(write_end)
    try:  # the job never closes its write end itself: end-of-file means it has exited
        assert _wait_for_eof(read_end), f"the job (pid {pidfile.read_text(encoding='utf-8')}) outlived its parent"
    finally:
        os.close(read_end)


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
    result = subprocess.run([sys.executable, "-c", script], timeout=60)
    assert result.returncode == 3  # the watchdog's exit, long before the 30 s sleep would end with 0
