"""Where the MedSSL backend is and how to start it: Python executable, environment, command lines, probes.

The backend package ``MedSSL`` ships with the extension, next to the module folders (installed tree:
``<qt-scripted-modules>/MedSSL``; source tree: ``<repo>/MedSSL``). The child process finds it through
``PYTHONPATH``; it is never imported here, and neither are torch nor MONAI (they are only checked in a
child process, see :func:`probeEnvironment`).

Overrides (environment variables): ``MEDSSL_BACKEND_PATH`` (folder containing ``MedSSL/``),
``MEDSSL_PYTHON`` (the child's Python), ``MEDSSL_WORK_DIR`` (where job folders go; else the modules' "Job
folder" setting, default ``~/MedSSL``).
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import shutil
import sys

from . import jobs

PACKAGE = "MedSSL"
DEFAULT_METHODS = [{"name": "genesis", "description": "Models Genesis: restore cubes after non-linear "
                    "intensity, local shuffling, in/out-painting"}]
"""Used when the backend cannot list its methods."""


def backendRoot() -> str | None:
    """Folder that contains the ``MedSSL`` package shipped with the extension (None: rely on an installed
    ``MedSSL`` in the child's Python). Looks at ``MEDSSL_BACKEND_PATH``, then upwards from this file."""
    candidates = []
    if os.environ.get("MEDSSL_BACKEND_PATH"):
        candidates.append(os.environ["MEDSSL_BACKEND_PATH"])
    here = os.path.dirname(os.path.abspath(__file__))
    for _ in range(3):  # MedSSLCommonLib -> module folder or qt-scripted-modules -> repository root
        here = os.path.dirname(here)
        candidates.append(here)
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, PACKAGE, "__init__.py")):
            return os.path.abspath(folder)
    return None


def insideSlicerApplication() -> bool:
    """True in Slicer's GUI (or ``--no-main-window``) process, False under PythonSlicer, slicer-core or
    plain Python."""
    slicer = sys.modules.get("slicer")
    return slicer is not None and getattr(slicer, "app", None) is not None


def pythonExecutable() -> str:
    """The child's Python: ``MEDSSL_PYTHON``; in Slicer, ``PythonSlicer`` (Slicer's own Python without the
    application, found as Slicer's own pip helpers find it); elsewhere ``sys.executable``."""
    if os.environ.get("MEDSSL_PYTHON"):
        return os.environ["MEDSSL_PYTHON"]
    if insideSlicerApplication():  # Slicer puts its bin folder on PATH; else look next to the executable
        found = shutil.which("PythonSlicer")
        candidate = os.path.join(os.path.dirname(sys.executable), "PythonSlicer" + (".exe" if os.name == "nt" else ""))
        if found or os.path.isfile(candidate):
            return found or candidate
    return sys.executable


def childEnvironment(extra: dict | None = None) -> dict:
    """Environment for a backend child process: this process's, with the backend folder first on
    ``PYTHONPATH``, unbuffered UTF-8 output, torch's per-operation CPU fallback on the Apple GPU (MPS), and
    ``extra`` on top."""
    env = dict(os.environ)
    root = backendRoot()
    if root:
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    env.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")  # Apple GPU: an operation MPS lacks runs on the CPU
    env.update(extra or {})
    return env


def command(subcommand: str, *args, python: str | None = None) -> list[str]:
    """argv of ``python -m MedSSL <subcommand> <args>`` (``None`` arguments are dropped)."""
    return [python or pythonExecutable(), "-m", PACKAGE, subcommand] + [str(a) for a in args if a is not None]


def budgetArgs(steps=None, maxTime=None, width=None, device=None, seed=None) -> list[str]:
    """Common training options: ``--steps N``, ``--max-time S`` (seconds), ``--width W``, ``--device``,
    ``--seed``; options left as None are not passed (the backend's defaults apply)."""
    args = []
    for flag, value in (("--steps", steps), ("--max-time", maxTime), ("--width", width)):
        if value is not None and value != "" and not float(value) > 0:
            raise ValueError(f"{flag} {value}: must be more than 0 (None for no limit)")
    for flag, value in (("--steps", steps), ("--max-time", maxTime), ("--width", width), ("--device", device),
                        ("--seed", seed)):
        if value is not None and value != "":
            args += [flag, str(int(value) if flag in ("--steps", "--width", "--seed") else value)]
    return args


def deviceArgs(device=None) -> list[str]:
    """``--device DEVICE``, or nothing when ``device`` is None (the backend's default applies)."""
    return ["--device", str(device)] if device else []


def parseJsonOutput(text: str):
    """The JSON a command printed: the whole output (indented JSON), else its last line that parses."""
    try:
        return json.loads(text)
    except ValueError:
        for line in reversed(text.strip().splitlines()):
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise ValueError("no JSON in the command's output")


# ----------------------------------------------------------------------------------- job folders


WORK_DIR_SETTING = "MedSSL/WorkDirectory"
"""Slicer application setting (the modules' "Job folder") holding the base folder of jobs and models."""


def workDirectory() -> str:
    """Base folder for job folders and default model outputs: ``MEDSSL_WORK_DIR``, else the Slicer
    setting :data:`WORK_DIR_SETTING` (in Slicer), else ``~/MedSSL``."""
    folder = os.environ.get("MEDSSL_WORK_DIR") or _slicerSetting(WORK_DIR_SETTING) or os.path.join("~", "MedSSL")
    return os.path.abspath(os.path.expanduser(folder))


KEEP_JOB_FILES_SETTING = "MedSSL/KeepJobFiles"
"""Slicer application setting (the modules' "Keep job outputs and logs"): "true" keeps job folders."""


def keepJobFilesSetting() -> bool:
    """The "Keep job outputs and logs" setting (False outside Slicer or when unset)."""
    return str(_slicerSetting(KEEP_JOB_FILES_SETTING)).strip().lower() in ("true", "1")


def _slicerSetting(key: str) -> str | None:
    """A non-empty string setting of the Slicer application (None outside Slicer or when unset)."""
    if not insideSlicerApplication():
        return None
    try:
        value = sys.modules["slicer"].app.userSettings().value(key)  # Slicer's QSettings (no Qt import here)
    except Exception:  # noqa: BLE001 - no settings: use the default
        return None
    return value if isinstance(value, str) and value.strip() else None


def newJobDirectory(kind: str, base: str | None = None) -> str:
    """A fresh folder ``<base>/jobs/<date-time>-<kind>-<random>`` (created)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(base or workDirectory(), "jobs", f"{stamp}-{kind}-{secrets.token_hex(3)}")
    os.makedirs(path)
    return path


def writeJson(path, data) -> str:
    """Write ``data`` as indented JSON; returns the path."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
    return str(path)


# ---------------------------------------------------------------------------------------- probes

PROBE_SCRIPT = r"""
import json, sys
out = {"python": sys.version.split()[0], "executable": sys.executable}
for name in ("torch", "monai", "SimpleITK", "safetensors", "MedSSL"):
    try:
        module = __import__(name)
        out[name] = getattr(module, "__version__", "installed")
    except Exception as exc:
        out[name] = None
        out[name + "_error"] = (exc.__class__.__name__ + ": " + str(exc))[:300]
out["cuda"] = []
out["mps"] = False
if out["torch"]:
    import torch
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out["cuda"].append({"name": p.name, "memory_gb": round(p.total_memory / 2**30, 1)})
    out["mps"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
print(json.dumps(out))
"""
"""Run in the child's Python to learn which dependencies import and which GPUs torch sees."""


def probeEnvironment(python: str | None = None, timeout: float = 180.0) -> dict:
    """Import torch, MONAI, SimpleITK, safetensors and MedSSL in a child process (never here) and report
    versions (None when missing, with ``<name>_error``) and GPUs: ``{"torch": "2.5.1", "monai": ...,
    "cuda": [{"name": ..., "memory_gb": ...}], "mps": bool, ...}``."""
    code, out, err = jobs.runQuick([python or pythonExecutable(), "-c", PROBE_SCRIPT], childEnvironment(), timeout)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if code != 0 or not lines:
        raise RuntimeError(f"checking the Python environment failed: {(err.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(lines[-1])


TORCH_MINIMUM = "2.1"
"""The oldest torch the backend runs on (an older one counts as missing: it must be upgraded)."""


def versionTuple(version) -> tuple[int, ...]:
    """(2, 5, 1) from "2.5.1+cu121" / "2.6.0.dev20250101"; () when it does not start with a number."""
    parts = []
    for part in str(version or "").split("+", 1)[0].split("."):
        digits = ""
        for char in part:
            if not char.isdigit():
                break
            digits += char
        if not digits:
            break
        parts.append(int(digits))
        if digits != part:
            break
    return tuple(parts)


def torchTooOld(probe: dict) -> bool:
    """True when torch imports but is older than :data:`TORCH_MINIMUM`."""
    version = probe.get("torch")
    return bool(version) and versionTuple(version) < versionTuple(TORCH_MINIMUM)


def missingDependencies(probe: dict) -> list[str]:
    """Names of backend dependencies that did not import in the child (from :func:`probeEnvironment`), and
    "torch" when the installed torch is older than :data:`TORCH_MINIMUM`."""
    missing = [name for name in ("torch", "monai", "SimpleITK", "safetensors") if not probe.get(name)]
    if torchTooOld(probe):
        missing.insert(0, "torch")
    return missing


def availableMethods(python: str | None = None, timeout: float = 120.0) -> list[dict]:
    """The backend's pretraining methods (``methods --json``): [{"name", "description", "data"}] (data:
    ``"--data PATH..."`` or ``"--datasets SPEC.json"``, what the method learns from). Falls back to
    :data:`DEFAULT_METHODS` when the backend cannot be run or answers nothing usable."""
    try:
        code, out, _err = jobs.runQuick(command("methods", "--json", python=python), childEnvironment(), timeout)
        methods = parseJsonOutput(out)["methods"] if code == 0 else None
    except (OSError, TimeoutError, ValueError, KeyError, IndexError, TypeError):
        methods = None
    if not methods or not all(isinstance(m, dict) and m.get("name") for m in methods):
        return [dict(m) for m in DEFAULT_METHODS]
    return [{"name": str(m["name"]), "description": str(m.get("description", "")),
             "data": str(m.get("data", "--data PATH..."))} for m in methods]


# --------------------------------------------------------------------------------- option defaults

GUI_DEFAULTS = {
    # Pretraining from the Trainer panel: a 2000-step budget, more than the CLI's default, because pretraining
    # from the panel is meant to run unattended on a GPU, overnight (the module's help says so). A GUI choice
    # made with the first Trainer panel and kept; remove the entry to show the backend's default instead.
    "pretrain": {"steps": 2000},
}
"""Where the Slicer panels deliberately differ from the backend's option defaults, all in this one place
({command: {option without dashes: value}}); every other default a panel shows is the backend's own
(:func:`commandDefaults`), and the logic leaves options at their backend defaults out of its command lines."""

_DEFAULTS_CACHE: dict = {}


def commandDefaults(python: str | None = None, timeout: float = 120.0) -> dict:
    """The backend's option defaults, ``info --defaults``: {"pretrain": {"steps": 1000, "batch-size": 6, ...},
    "finetune": {...}, "predict": {...}, "suggest": {...}} (option names without dashes; run-time-decided ones
    are None). Asked once per Python executable and cached (:func:`cachedDefaults`); raises ``RuntimeError``
    when the backend cannot answer (nothing is cached then)."""
    executable = python or pythonExecutable()
    try:
        code, out, err = jobs.runQuick(command("info", "--defaults", python=executable), childEnvironment(), timeout)
        answer = parseJsonOutput(out) if code == 0 else None
    except (OSError, TimeoutError, ValueError) as exc:
        raise RuntimeError(f"the backend's option defaults could not be read: {exc}") from None
    if not isinstance(answer, dict) or not all(isinstance(v, dict) for v in answer.values()):
        reason = (jobs.errorReason(err) or "exit status " + str(code)) if code != 0 else "unexpected answer"
        raise RuntimeError(f"the backend's option defaults could not be read: {reason}")
    _DEFAULTS_CACHE[executable] = answer
    return answer


def cachedDefaults(python: str | None = None) -> dict | None:
    """What :func:`commandDefaults` last answered for this Python (None: not asked yet, or it failed)."""
    return _DEFAULTS_CACHE.get(python or pythonExecutable())


def guiDefault(defaults: dict | None, subcommand: str, option: str):
    """The value a panel shows for ``option`` of ``subcommand``: the deliberate difference in
    :data:`GUI_DEFAULTS` if there is one, else the backend's default from ``defaults`` (None when unknown)."""
    if option in GUI_DEFAULTS.get(subcommand, {}):
        return GUI_DEFAULTS[subcommand][option]
    return ((defaults or {}).get(subcommand) or {}).get(option)


def runtimeDefault(defaults: dict | None, option: str):
    """The backend's default of an option every command shares (``device``, ``seed``, ...): the value when all
    commands that have the option agree, else None."""
    values = {json.dumps(options[option]) for options in (defaults or {}).values() if option in options}
    return json.loads(values.pop()) if len(values) == 1 else None


def initialGuiDefault(subcommand: str, option: str):
    """What a panel shows for a budget option before the backend has answered: the deliberate difference in
    :data:`GUI_DEFAULTS`, else 0 ("no limit": the option is then left out, so the backend's default applies
    anyway)."""
    value = guiDefault(None, subcommand, option)
    return 0 if value is None else value


def unlessDefault(defaults: dict | None, subcommand: str, option: str, value):
    """``value``, or None when it is the backend's default for that option (so the option is left out and the
    backend's default applies); unchanged when the defaults are not known."""
    known = (defaults or {}).get(subcommand) or {}
    if value is not None and option in known and known[option] is not None and known[option] == value:
        return None
    return value


def bundleInfo(modelDir, python: str | None = None, timeout: float = 120.0) -> dict:
    """model.json of a bundle folder, read directly (no child process); for a file (an official Models
    Genesis ``.pt``) the backend's ``info FILE --json``. Raises ``ValueError`` with the reason when it is not
    a usable model."""
    path = os.path.join(str(modelDir), "model.json")
    if os.path.isdir(str(modelDir)) and not os.path.isfile(path):
        raise ValueError(f"{modelDir}: not a MedSSL model folder (no model.json)")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as handle:
                info = json.load(handle)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: unreadable model.json ({exc})") from None
    else:
        code, out, err = jobs.runQuick(command("info", str(modelDir), "--json", python=python), childEnvironment(),
                                       timeout)
        if code != 0:
            raise ValueError(jobs.errorReason(err) or f"{modelDir}: not a MedSSL model bundle")
        info = parseJsonOutput(out)
    if not isinstance(info, dict):
        raise ValueError(f"{modelDir}: model.json is not an object")
    return info


def bundleTask(info: dict) -> str:
    """"segment", "detect", "classify" or "pretrain": a segmentation bundle marked ``"detection": true``
    counts as a detector."""
    task = str(info.get("task") or "segment")
    if task == "segment" and info.get("detection"):
        return "detect"
    return task
