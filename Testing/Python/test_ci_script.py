"""The CI entry point (.ci/run) runs the README's test command and leaves no cube cache behind, whether
the tests pass or fail. Run here without its venv and pip steps: the test command is replaced by one that
fills the cache and exits with the given status."""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("status", [0, 1])
def test_ci_runs_pytest_and_removes_its_cube_cache(status, tmp_path):
    script = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    setup = next(line for line in readme.splitlines() if '-e ".[test]" && ' in line)
    test_command = setup.rsplit("&& ", 1)[1].strip()
    assert test_command.startswith("python -m pytest -q")
    assert script.rstrip().endswith(test_command)  # the README's command, last
    body = [line for line in script.splitlines()
            if not line.startswith(("python3 -m venv", ". .venv/bin/activate", "python -m pip"))]
    body[-1] = (f'echo "$MEDSSL_CACHE" > {tmp_path / "cache_path"}; mkdir -p "$MEDSSL_CACHE/sub"; '
                f'touch "$MEDSSL_CACHE/sub/cube.npy"; exit {status}')
    stub = tmp_path / "ci" / "run"
    stub.parent.mkdir()
    stub.write_text("\n".join(body) + "\n", encoding="utf-8")
    temp = tmp_path / "tmp"
    temp.mkdir()
    done = subprocess.run(["bash", str(stub)], env={**os.environ, "TMPDIR": str(temp)}, capture_output=True, text=True)
    assert done.returncode == status, done.stderr
    cache = Path((tmp_path / "cache_path").read_text(encoding="utf-8").strip())
    assert cache.parent == temp and cache.name.startswith("medssl-ci-cache-")
    assert not cache.exists() and not any(temp.iterdir())
