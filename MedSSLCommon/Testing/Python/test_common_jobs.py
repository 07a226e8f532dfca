"""The job runner: JSON-lines events, log file, failure reasons, command sequences, cancel of a process tree.
Pure Python (no slicer needed): the child is a small script written by each test."""

import os
import signal
import sys
import textwrap
import time

import pytest

from MedSSLCommonLib import jobs


def script(tmp_path, body, name="child.py"):
    path = tmp_path / name
    path.write_text("import json, os, sys, time\n" + textwrap.dedent(body), encoding="utf-8")
    return [sys.executable, str(path)]


def test_events_log_and_result(tmp_path):
    child = script(tmp_path, """
        for step in (1, 2):
            print(json.dumps({"event": "progress", "step": step, "total": 2, "loss": 1.0 / step, "eta_s": 2 - step}))
        print("plain text line")
        print("{not json")
        print(json.dumps({"methods": []}))
        print("warning on stderr", file=sys.stderr)
        print(json.dumps({"event": "done", "bundle": "/x"}))
    """)
    seen = []
    job = jobs.Job([child], tmp_path / "job", onEvent=seen.append)
    job.start()
    assert job.wait(timeout=60) == {"event": "done", "bundle": "/x"}
    assert [e["event"] for e in seen] == ["progress", "progress", "done"]
    assert job.lastProgress["step"] == 2 and job.outputs == [{"methods": []}]
    log = job.readLog()
    assert "plain text line" in log and "warning on stderr" in log and "job done" in log


def test_failure_reports_backend_reason_and_keeps_log(tmp_path):
    child = script(tmp_path, """
        print("Traceback noise", file=sys.stderr)
        print("medssl: error: /data/x.nii.gz: not a 3D image", file=sys.stderr)
        sys.exit(2)
    """)
    job = jobs.Job([child, child], tmp_path / "job")
    job.start()
    with pytest.raises(jobs.JobError, match=r"^/data/x.nii.gz: not a 3D image$"):
        job.wait(timeout=60)
    assert job.status == jobs.FAILED and job.returnCode == 2 and job.commandIndex == 0
    assert "Traceback noise" in job.readLog()


def test_failure_without_reason_names_status_and_log(tmp_path):
    job = jobs.Job([script(tmp_path, "print('boom', file=sys.stderr); sys.exit(3)")], tmp_path / "job")
    job.start()
    with pytest.raises(jobs.JobError, match="exited with status 3: boom"):
        job.wait(timeout=60)


def test_commands_run_in_sequence_then_onfinished(tmp_path):
    first = script(tmp_path, "open('first.txt', 'w').write('1')\n", "first.py")
    second = script(tmp_path, "assert os.path.exists('first.txt'); print(json.dumps({'event': 'done'}))\n", "second.py")
    job = jobs.Job([first, second], tmp_path / "job", onFinished=lambda j: ("imported", j.commandIndex))
    job.start()
    assert job.wait(timeout=60) == ("imported", 1)


def test_onfinished_error_fails_the_job(tmp_path):
    def importer(job):
        raise RuntimeError("bad labelmap")

    job = jobs.Job([script(tmp_path, "pass\n")], tmp_path / "job", onFinished=importer)
    job.start()
    with pytest.raises(jobs.JobError, match="importing the results failed: bad labelmap"):
        job.wait(timeout=60)


def test_poll_does_not_block(tmp_path):
    job = jobs.Job([script(tmp_path, "time.sleep(30)\n")], tmp_path / "job")
    job.start()
    assert job.poll() == [] and job.running  # poll returned while the child still runs: it did not wait
    job.cancel()


def alive(pid):
    try:
        with open(f"/proc/{pid}/status") as handle:
            return "\nState:\tZ" not in handle.read()
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="checks /proc")
@pytest.mark.parametrize("ignore_term", [False, True])
def test_cancel_ends_the_whole_tree(tmp_path, ignore_term):
    """Cancel ends the child and its grandchild: SIGTERM, and SIGKILL after the grace period for a child
    that ignores SIGTERM (its exit status says which signal ended it; no wall-clock bound)."""
    pid_file = tmp_path / "grandchild.pid"
    child = script(tmp_path, f"""
        import signal, subprocess
        if {ignore_term}:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        grandchild = subprocess.Popen([sys.executable, "-c", "import time\\nwhile True: time.sleep(1)"])
        open({str(pid_file)!r}, "w").write(str(grandchild.pid))
        while True:
            print(json.dumps({{"event": "progress", "step": 1, "total": 10}}), flush=True)
            time.sleep(0.1)
    """)
    job = jobs.Job([child], tmp_path / "job")
    job.start()
    deadline = time.monotonic() + 30
    while not (job.events and pid_file.exists() and pid_file.read_text(encoding="utf-8")) and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.05)
    grandchild = int(pid_file.read_text(encoding="utf-8"))
    assert alive(grandchild)
    job.cancel(grace=1.0 if ignore_term else 2.0)
    assert job.status == jobs.CANCELLED
    assert job.returnCode == -(signal.SIGKILL if ignore_term else signal.SIGTERM)
    time.sleep(0.2)
    assert not alive(job._process.pid) and not alive(grandchild)
    with pytest.raises(jobs.JobError, match="cancelled"):
        job.wait()


def test_run_quick_and_error_reason(tmp_path):
    code, out, err = jobs.runQuick(script(tmp_path, "print('hi'); print('medssl: error: nope', file=sys.stderr); sys.exit(2)"))
    assert (code, out.strip()) == (2, "hi") and jobs.errorReason(err) == "nope"


def test_missing_executable_raises_job_error(tmp_path):
    job = jobs.Job([[os.path.join(str(tmp_path), "no-such-python"), "-c", "pass"]], tmp_path / "job")
    with pytest.raises(jobs.JobError, match="cannot start"):
        job.start()
    assert job.status == jobs.FAILED
