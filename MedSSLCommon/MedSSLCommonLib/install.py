"""Installing the backend's dependencies into Slicer's Python, on first use, with the user's consent.

torch comes from the PyTorch extension's installer (``PyTorchUtils``, which picks the CUDA build for the
GPU) when that extension is present, else from pip. pip never chooses torch: MONAI is pinned to a release
range that accepts the torch that is installed (:data:`MONAI_FOR_TORCH`; MONAI 1.5 needs torch >= 2.4.1 and
1.6 torch >= 2.8, so a plain ``pip install monai`` on an older torch would replace the user's GPU build by
PyPI's, CPU-only on Windows), and every pip call gets a constraint holding torch at its installed version.
MONAI and the rest come from ``Resources/requirements.txt`` through ``slicer.util.pip_install``. What is
installed is checked by importing it in a child process (:func:`backend.probeEnvironment`), version
included, never in Slicer's own process. The confirmation dialog lists what will be installed before
anything is. Nothing is installed in testing mode. Needs the Slicer application (dialogs).
"""

from __future__ import annotations

import logging
import os
import tempfile

import slicer

from . import backend

TORCH_REQUIREMENT = f"torch>={backend.TORCH_MINIMUM}"

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
        plan.append(f"torch {backend.TORCH_MINIMUM} or newer{have}, by the PyTorch extension (the build for your "
                    "GPU; a few GB)")
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
    if slicer.app.testingEnabled():
        raise RuntimeError(f"missing Python packages {', '.join(missing)} (not installed in testing mode)")
    plan = installPlan(environment)
    message = (f"MedSSL needs Python packages that are missing or too old in Slicer's Python: {', '.join(missing)}."
               "\n\nThis will install:\n" + "\n".join(f"- {line}" for line in plan) +
               "\n\nInstall now? It can take several minutes. Slicer may need a restart afterwards.")
    if not slicer.util.confirmOkCancelDisplay(message, "MedSSL: install dependencies"):
        raise RuntimeError(f"missing Python packages: {', '.join(missing)}")
    if not environment.get("torch") or backend.torchTooOld(environment):
        installTorch()
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


def installTorch() -> None:
    """Install torch >= TORCH_MINIMUM through the PyTorch extension when it is there (right CUDA build), else
    with pip."""
    try:
        import PyTorchUtils  # the PyTorch extension (EXTENSION_DEPENDS); absent when installed without it
    except ImportError:
        PyTorchUtils = None
    if PyTorchUtils is not None:
        logging.info("MedSSL: installing torch with the PyTorch extension")
        PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                      torchVersionRequirement=f">={backend.TORCH_MINIMUM}")
        return
    logging.info("MedSSL: PyTorch extension not found, installing torch with pip")
    _pipInstall([TORCH_REQUIREMENT])


def installRequirements(torchVersion) -> None:
    """pip-install Resources/requirements.txt with MONAI pinned to the range that accepts ``torchVersion``
    and torch held at that version (a constraint), so pip can never swap the installed torch."""
    wanted = [monaiRequirement(torchVersion) if r.lower().startswith("monai") else r for r in requirements()]
    handle, constraints = tempfile.mkstemp(prefix="medssl-constraints-", suffix=".txt")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(f"torch=={'.'.join(str(v) for v in backend.versionTuple(torchVersion))}\n")
        _pipInstall(wanted, ["--constraint", constraints])
    finally:
        os.remove(constraints)


def _pipInstall(requirementList: list[str], options=()) -> None:
    """pip install with Slicer's helper ``slicer.util.pip_install`` under a wait cursor."""
    with slicer.util.WaitCursor():
        slicer.util.showStatusMessage(f"MedSSL: installing {', '.join(requirementList)}...")
        slicer.util.pip_install([*options, *requirementList])
