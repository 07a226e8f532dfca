"""Installing the backend's dependencies into Slicer's Python, on first use, with the user's consent.

torch comes from the PyTorch extension's installer (``PyTorchUtils``, which picks the CUDA build for the
GPU) when that extension is present, else from pip; MONAI and the rest from ``Resources/requirements.txt``
through ``slicer.packaging`` (Slicer 5.11+) or ``slicer.util.pip_install``. What is installed is checked by
importing it in a child process (:func:`backend.probeEnvironment`), never in Slicer's own process. Nothing is
installed in testing mode. Needs the Slicer application (dialogs).
"""

from __future__ import annotations

import logging
import os

import slicer

from . import backend

TORCH_REQUIREMENT = "torch>=2.1"


def requirementsPath() -> str:
    """MedSSLSegment's ``Resources/requirements.txt`` (next to this package in the source and install trees)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(here, "Resources", "requirements.txt")


def requirements() -> list[str]:
    """The pip requirements of the backend besides torch, one per non-comment line."""
    with open(requirementsPath(), encoding="utf-8") as handle:
        lines = [line.split("#", 1)[0].strip() for line in handle]
    return [line for line in lines if line]


def ensureBackendReady(environment: dict | None = None) -> dict:
    """Make sure torch, MONAI and the rest import in the child's Python, offering to install what is
    missing. Returns the environment probe; raises ``RuntimeError`` when something is still missing
    (user declined, testing mode, or the install failed)."""
    environment = environment or backend.probeEnvironment()
    missing = backend.missingDependencies(environment)
    if not missing:
        return environment
    if slicer.app.testingEnabled():
        raise RuntimeError(f"missing Python packages {', '.join(missing)} (not installed in testing mode)")
    message = (f"MedSSL needs these Python packages, which are not installed in Slicer's Python: "
               f"{', '.join(missing)}.\n\nInstall them now? This downloads up to a few GB (PyTorch) and can take "
               "several minutes. Slicer may need a restart afterwards.")
    if not slicer.util.confirmOkCancelDisplay(message, "MedSSL: install dependencies"):
        raise RuntimeError(f"missing Python packages: {', '.join(missing)}")
    if "torch" in missing:
        installTorch()
    installRequirements()
    environment = backend.probeEnvironment()
    missing = backend.missingDependencies(environment)
    if missing:
        reasons = "; ".join(f"{name}: {environment.get(name + '_error', 'not found')}" for name in missing)
        raise RuntimeError(f"still missing after installation: {reasons}")
    return environment


def installTorch() -> None:
    """Install torch through the PyTorch extension when it is there (right CUDA build), else with pip."""
    try:
        import PyTorchUtils  # the PyTorch extension (EXTENSION_DEPENDS); absent when installed without it
    except ImportError:
        PyTorchUtils = None
    if PyTorchUtils is not None:
        logging.info("MedSSL: installing torch with the PyTorch extension")
        PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                      torchVersionRequirement=TORCH_REQUIREMENT[len("torch"):])
        return
    logging.info("MedSSL: PyTorch extension not found, installing torch with pip")
    _pipInstall([TORCH_REQUIREMENT])


def installRequirements() -> None:
    """pip-install Resources/requirements.txt (MONAI, safetensors, scipy), with a progress dialog."""
    _pipInstall(requirements())


def _pipInstall(requirementList: list[str]) -> None:
    """pip install with Slicer's helpers: ``slicer.packaging.pip_install`` (progress dialog) when present,
    else ``slicer.util.pip_install`` under a wait cursor."""
    packaging = getattr(slicer, "packaging", None)
    if packaging is not None and hasattr(packaging, "pip_install"):
        try:
            packaging.pip_install(requirementList, show_progress=True, requester="MedSSL")
            return
        except TypeError:  # an older signature: fall back to the plain helper
            logging.info("MedSSL: slicer.packaging.pip_install signature differs, using slicer.util.pip_install")
    with slicer.util.WaitCursor():
        slicer.util.showStatusMessage(f"MedSSL: installing {', '.join(requirementList)}...")
        slicer.util.pip_install(list(requirementList))
