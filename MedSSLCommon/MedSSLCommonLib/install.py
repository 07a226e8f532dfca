"""Installing the backend's dependencies into Slicer's Python, on first use, with the user's consent.

torch comes from light-the-torch (the installer the PyTorch extension uses; it picks the CUDA build for the
NVIDIA driver it finds, else the CPU build, and on macOS PyPI's build with Apple-GPU support), run as
``PythonSlicer -m light_the_torch install torch...`` in a child process: torch is never imported in Slicer's
own process (the PyTorch extension's ``installTorch`` ends with ``import torch`` there, which would lock
torch's files on Windows until a restart, and adds torchvision, which the backend does not use). pip never
chooses torch: MONAI is pinned to a release
range that accepts the torch that is installed (:data:`MONAI_FOR_TORCH`; MONAI 1.5 needs torch >= 2.4.1 and
1.6 torch >= 2.8, so a plain ``pip install monai`` on an older torch would replace the user's GPU build by
PyPI's, CPU-only on Windows), and every pip call gets a constraint holding torch at its installed version.
MONAI and the rest come from ``Resources/requirements.txt`` through ``slicer.util.pip_install`` (also a
child process). What is installed is checked by importing it in a child process
(:func:`backend.probeEnvironment`), version included, never in Slicer's own process. The confirmation
dialog lists what will be installed before anything is; an unsupported Slicer or Python is refused first
(:func:`unsupportedReason`); a failed download (offline, proxy) ends in one readable line. Nothing is
installed in testing mode. Needs the Slicer application (dialogs).
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile

import slicer

from . import backend
from .i18n import tr as _

SLICER_MINIMUM = (5, 6)
"""The oldest Slicer supported (Python 3.9; see docs/slicer.md)."""

PYTHON_MINIMUM = (3, 9)
"""The oldest Python the backend runs on (Slicer 5.6 and 5.8 embed 3.9)."""

TORCH_LAST_FOR_PYTHON_39 = "2.9"
"""torch 2.9 and newer need Python 3.10: on Python 3.9 torch is held below it."""

LIGHT_THE_TORCH = "light-the-torch>=0.7"


def torchRequirement(pythonVersion) -> str:
    """The torch requirement for the child's Python version ("3.9.10"): at least :data:`backend.TORCH_MINIMUM`,
    and below 2.9 on Python 3.9 (no newer wheels exist for it)."""
    requirement = f"torch>={backend.TORCH_MINIMUM}"
    if backend.versionTuple(pythonVersion)[:2] == (3, 9):
        requirement += f",<{TORCH_LAST_FOR_PYTHON_39}"
    return requirement


def unsupportedReason(environment: dict, slicerVersion=None) -> str:
    """One line when this Slicer or its Python is not supported ('' when it is). ``slicerVersion``: (major,
    minor), default the running application's."""
    if slicerVersion is None:
        slicerVersion = (int(slicer.app.majorVersion), int(slicer.app.minorVersion))
    python = backend.versionTuple(environment.get("python"))
    if tuple(slicerVersion) < SLICER_MINIMUM:
        return _("MedSSL needs Slicer {minimum} or newer; this is Slicer {version}: install a newer Slicer.").format(
            minimum=".".join(map(str, SLICER_MINIMUM)), version=".".join(map(str, slicerVersion)))
    if python and python[:2] < PYTHON_MINIMUM:
        return _("MedSSL needs Python {minimum} or newer in Slicer; this Slicer's Python is {version}.").format(
            minimum=".".join(map(str, PYTHON_MINIMUM)), version=environment.get("python"))
    return ""

MONAI_FOR_TORCH = [
    ("2.8", "monai>=1.3,<1.7"),
    ("2.4.1", "monai>=1.3,<1.6"),
    (backend.TORCH_MINIMUM, "monai>=1.3,<1.5"),
]
"""(oldest torch, MONAI requirement), newest first: the MONAI releases that accept that torch (MONAI 1.6
requires torch >= 2.8.0, 1.5 torch >= 2.4.1, 1.3 and 1.4 much older ones)."""


def monaiRequirement(torchVersion) -> str:
    """The MONAI requirement for an installed torch version (``ValueError`` when torch is too old)."""
    have = backend.versionTuple(torchVersion)
    for minimum, requirement in MONAI_FOR_TORCH:
        if have >= backend.versionTuple(minimum):
            return requirement
    raise ValueError(f"torch {torchVersion} is older than {backend.TORCH_MINIMUM}")


def installPlan(environment: dict) -> list[str]:
    """What :func:`ensureBackendReady` will install, one line each, for the confirmation dialog."""
    plan = []
    torchVersion = environment.get("torch")
    if not torchVersion or backend.torchTooOld(environment):
        have = f" (replacing torch {torchVersion})" if torchVersion else ""
        plan.append(f"{LIGHT_THE_TORCH} with pip (the installer the PyTorch extension uses)")
        plan.append(f"{torchRequirement(environment.get('python'))}{have} with light-the-torch: the CUDA build for "
                    "your NVIDIA driver, else the CPU build (on macOS PyPI's build, which uses the Apple GPU); a few "
                    "GB; not torchvision")
        monai = f"{MONAI_FOR_TORCH[-1][1]} (or the newer range that fits the torch installed)"
    else:
        monai = monaiRequirement(torchVersion)
    others = [r for r in requirements() if not r.lower().startswith("monai")]
    plan.append(f"{monai}, {', '.join(others)} with pip; torch is held at its installed version")
    return plan


def requirementsPath() -> str:
    """MedSSLCommon's ``Resources/requirements.txt`` (next to this package in the source and install trees)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(here, "Resources", "requirements.txt")


def requirements() -> list[str]:
    """The pip requirements of the backend besides torch, one per non-comment line."""
    with open(requirementsPath(), encoding="utf-8") as handle:
        lines = [line.split("#", 1)[0].strip() for line in handle]
    return [line for line in lines if line]


def ensureBackendReady(environment: dict | None = None) -> dict:
    """Make sure torch (at least :data:`backend.TORCH_MINIMUM`), MONAI and the rest import in the child's
    Python, offering to install what is missing. Returns the environment probe; raises ``RuntimeError``
    when something is still missing (user declined, testing mode, or the install failed)."""
    environment = environment or backend.probeEnvironment()
    missing = backend.missingDependencies(environment)
    if not missing:
        return environment
    unsupported = unsupportedReason(environment)
    if unsupported:
        raise RuntimeError(unsupported)
    if slicer.app.testingEnabled():
        raise RuntimeError(f"missing Python packages {', '.join(missing)} (not installed in testing mode)")
    plan = installPlan(environment)
    message = _("MedSSL needs Python packages that are missing or too old in Slicer's Python: {names}.\n\n"
                "This will install:\n{plan}\n\nInstall now? It can take several minutes. Slicer may need a "
                "restart afterwards.").format(names=", ".join(missing), plan="\n".join(f"- {line}" for line in plan))
    if not slicer.util.confirmOkCancelDisplay(message, _("MedSSL: install dependencies")):
        raise RuntimeError(f"missing Python packages: {', '.join(missing)}")
    if not environment.get("torch") or backend.torchTooOld(environment):
        installTorch(environment.get("python"))
        environment = backend.probeEnvironment()
        if not environment.get("torch") or backend.torchTooOld(environment):
            raise RuntimeError(f"torch {backend.TORCH_MINIMUM} or newer is needed; after installation: "
                               f"{environment.get('torch') or environment.get('torch_error', 'not found')}")
    installRequirements(environment["torch"])
    environment = backend.probeEnvironment()
    missing = backend.missingDependencies(environment)
    if missing:
        reasons = "; ".join(f"{name}: {environment.get(name + '_error') or environment.get(name) or 'not found'}"
                            for name in missing)
        raise RuntimeError(f"still missing after installation: {reasons}")
    return environment


def installTorch(pythonVersion=None) -> None:
    """Install torch (:func:`torchRequirement`) with light-the-torch in a child process (``PythonSlicer -m
    light_the_torch``): the build for the GPU, and torch is not imported in Slicer's process."""
    logging.info("MedSSL: installing torch with light-the-torch")
    _pipInstall([LIGHT_THE_TORCH])
    _runPythonModule("light_the_torch", ["install", torchRequirement(pythonVersion or "")], "torch")


def installRequirements(torchVersion) -> None:
    """pip-install Resources/requirements.txt with MONAI pinned to the range that accepts ``torchVersion``
    and torch held at exactly that version (a constraint with the whole version string: nightly, pre-release
    and custom builds such as ``2.6.0.dev20250101+cu124`` or ``2.1.0a0+git1234`` stay), so pip can never swap
    the installed torch."""
    wanted = [monaiRequirement(torchVersion) if r.lower().startswith("monai") else r for r in requirements()]
    handle, constraints = tempfile.mkstemp(prefix="medssl-constraints-", suffix=".txt")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(f"torch=={str(torchVersion).strip()}\n")
        _pipInstall(wanted, ["--constraint", constraints])
    finally:
        os.remove(constraints)


def _pipInstall(requirementList: list[str], options=()) -> None:
    """pip install in a child process (Slicer's ``slicer.util.pip_install``)."""
    slicer.util.showStatusMessage(f"MedSSL: installing {', '.join(requirementList)}...")
    try:
        slicer.util.pip_install([*options, *requirementList])
    except (subprocess.CalledProcessError, OSError) as exc:
        raise RuntimeError(_failure(", ".join(requirementList), exc)) from None


def _runPythonModule(module: str, args: list[str], what: str) -> None:
    """``PythonSlicer -m module args`` as Slicer runs pip (a child process whose output goes to the log)."""
    slicer.util.showStatusMessage(f"MedSSL: installing {what}...")
    try:
        slicer.util._executePythonModule(module, args)
    except (subprocess.CalledProcessError, OSError) as exc:
        raise RuntimeError(_failure(what, exc)) from None


def _failure(what: str, exc) -> str:
    """One readable line for a failed install (instead of pip's ``CalledProcessError``)."""
    status = f"exit status {exc.returncode}" if isinstance(exc, subprocess.CalledProcessError) else str(exc)
    return _("installing {what} failed ({status}): check the internet connection (or proxy settings) and try "
             "again; pip's messages are in the Python console").format(what=what, status=status)
