"""The stand-in backend of the Slicer tests (MedSSLCommon/Testing/Python/fake_medssl.py) cannot drift from the
real CLI: the Slicer-side tests that drive the stand-in are run with every ``python -m MedSSL ...`` command
line they start recorded, and each recorded command line must be accepted by the real parser (same
sub-command, options and values). ``sleep`` is the stand-in's own test command (cancel tests) and is left out."""

import json
import os
import subprocess
import sys
from pathlib import Path


from MedSSL.commands.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
STAND_IN_TESTS = ["MedSSLSegment/Testing/Python/test_segment_logic.py",
                  "MedSSLSegment/Testing/Python/test_segment_widgets.py",
                  "MedSSLTrainer/Testing/Python/test_trainer_logic.py",
                  "MedSSLTrainer/Testing/Python/test_trainer_widgets.py"]
RECORDER = '''
import json, os, subprocess
_LOG = os.environ["MEDSSL_ARGV_LOG"]
_real_init = subprocess.Popen.__init__
def _recording_init(self, args, *rest, **kwargs):
    if isinstance(args, (list, tuple)):
        argv = [str(a) for a in args]
        if "-m" in argv and argv[argv.index("-m") + 1:argv.index("-m") + 2] == ["MedSSL"]:
            with open(_LOG, "a") as handle:
                handle.write(json.dumps(argv[argv.index("-m") + 2:]) + "\\n")
    _real_init(self, args, *rest, **kwargs)
subprocess.Popen.__init__ = _recording_init
'''


def test_every_command_line_sent_to_the_stand_in_is_accepted_by_the_real_cli(tmp_path):
    (tmp_path / "medssl_argv_recorder.py").write_text(RECORDER, encoding="utf-8")
    log = tmp_path / "argv.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "MEDSSL_ARGV_LOG": str(log),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "medssl_argv_recorder",
                           "-p", "no:cacheprovider", *STAND_IN_TESTS], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    lines = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    commands = [argv for argv in lines if argv and argv[0] != "sleep"]
    # the Slicer modules' whole vocabulary reaches the stand-in in these tests
    assert {"pretrain", "finetune", "predict", "suggest", "methods"} <= {argv[0] for argv in commands}
    parser = build_parser()
    refused = []
    for argv in {tuple(a) for a in commands}:
        try:
            args = parser.parse_args(list(argv))
        except SystemExit:
            refused.append(" ".join(argv))
            continue
        assert args.command == argv[0]
    assert not refused, "the real CLI refuses:\n" + "\n".join(sorted(refused))
