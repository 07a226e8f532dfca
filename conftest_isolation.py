"""pytest plugin (loaded by the root conftest.py): the suite runs in a shuffled order and no test leaks
process-wide state into the next.

* Order: test files in a shuffled order, and the tests of each file shuffled, from a fixed seed printed in
  the header (``test order: seed 23``), so every run is the same and an order-dependent failure can be
  replayed. ``MEDSSL_TEST_ORDER_SEED=N`` picks another order, ``MEDSSL_TEST_ORDER_SEED=file`` keeps
  pytest's file order. Shuffling files as wholes keeps module-scoped fixtures built once.
* State: around every test the working directory, the environment (but pytest's own PYTEST_* variables), the locale and torch's CPU thread
  count (when torch is imported) are recorded and put back; the tests that changed them are listed at the
  end of the run. A test that needs another locale or environment changes it for itself only.
"""

from __future__ import annotations

import locale
import os
import random
import sys

import pytest

DEFAULT_ORDER_SEED = "23"
LOCALE_CATEGORIES = ("LC_CTYPE", "LC_NUMERIC", "LC_TIME", "LC_COLLATE", "LC_MONETARY", "LC_MESSAGES")
_RESTORED: list[tuple[str, list[str]]] = []

# as the CLI sets it when imported (MedSSL/commands/cli.py), so that import is not a change of state
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# as MONAI sets it when imported (monai/utils/misc.py)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _order_seed() -> str:
    return os.environ.get("MEDSSL_TEST_ORDER_SEED", DEFAULT_ORDER_SEED)


def pytest_report_header(config):
    seed = _order_seed()
    return "test order: file order" if seed == "file" else f"test order: seed {seed} (MEDSSL_TEST_ORDER_SEED)"


def pytest_collection_modifyitems(session, config, items):
    """Shuffle the files, then the tests inside each file, with the seed of the header."""
    seed = _order_seed()
    if seed == "file":
        return
    rng = random.Random(int(seed))
    by_file: dict[str, list] = {}
    for item in items:
        by_file.setdefault(str(item.path), []).append(item)
    files = list(by_file)
    rng.shuffle(files)
    items[:] = [item for name in files for item in rng.sample(by_file[name], len(by_file[name]))]


def _process_state() -> dict:
    """What one test may not leave changed for the next: cwd, environment, locale, torch threads."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    state = {"cwd": os.getcwd(), "environment": environment}
    for name in LOCALE_CATEGORIES:
        category = getattr(locale, name, None)
        if category is not None:
            state[name] = locale.setlocale(category)
    torch = sys.modules.get("torch")
    if torch is not None:
        state["torch threads"] = torch.get_num_threads()
    return state


def _restore(state: dict) -> None:
    os.chdir(state["cwd"])
    for key in [key for key in os.environ if not key.startswith("PYTEST_") and key not in state["environment"]]:
        del os.environ[key]
    os.environ.update(state["environment"])
    for name in LOCALE_CATEGORIES:
        if name in state:
            locale.setlocale(getattr(locale, name), state[name])
    if "torch threads" in state:
        sys.modules["torch"].set_num_threads(state["torch threads"])


@pytest.fixture(autouse=True)
def _process_state_is_put_back(request):
    before = _process_state()
    yield
    after = _process_state()
    changed = [key for key in before if before[key] != after.get(key)]
    if "environment" in changed:
        names = sorted(set(before["environment"]) ^ set(after["environment"]) | {
            key for key in before["environment"] if after["environment"].get(key, before["environment"][key]) != before["environment"][key]})
        changed[changed.index("environment")] = f"environment ({', '.join(names)})"
    if changed:
        _RESTORED.append((request.node.nodeid, changed))
        _restore(before)


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(pytest_report_header(None))
    if _RESTORED:
        terminalreporter.write_sep("-", f"process-wide state put back after {len(_RESTORED)} test(s)")
        for nodeid, changed in _RESTORED:
            terminalreporter.write_line(f"{nodeid}: {', '.join(changed)}")
