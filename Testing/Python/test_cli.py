"""The CLI's shape: sub-commands, one-line errors, --parent-pid watchdog, python -m MedSSL."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from MedSSL.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]


def test_every_command_is_registered():
    parser = build_parser()
    names = set(parser._subparsers._group_actions[0].choices)
    assert {"pretrain", "finetune", "predict", "evaluate", "suggest", "info", "methods", "demo"} <= names


def test_methods_json_is_one_line_listing_genesis(capsys):
    assert main(["methods", "--json"]) == 0
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1
    names = [m["name"] for m in json.loads(out)["methods"]]
    assert "genesis" in names


def test_usage_errors_are_one_line(capsys):
    try:
        main(["pretrain", "--out", "x"])
    except SystemExit as exc:
        assert exc.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medssl: error:") and "--data" in err[0]


def test_python_dash_m_and_the_parent_watchdog(tmp_path):
    """A job started with --parent-pid exits soon after that process is gone."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    script = ("import sys, time; from MedSSL.commands.common import watch_parent; "
              f"watch_parent({parent.pid}, interval=0.2); time.sleep(60); sys.exit(0)")
    child = subprocess.Popen([sys.executable, "-c", script], env=env)
    parent.wait()
    started = time.monotonic()
    assert child.wait(timeout=30) == 3
    assert time.monotonic() - started < 30
    done = subprocess.run([sys.executable, "-m", "MedSSL", "--version"], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("medssl ")
