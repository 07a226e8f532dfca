"""Common base of the MedSSL logic classes: settings, job folders, and the blocking / non-blocking switch.

Qt-free; the scene is ``slicer.mrmlScene`` unless one is given.
"""

from __future__ import annotations

import functools
import os
import shutil

from . import backend, jobs, nodes


def removesUnstartedJobFolders(method):
    """Decorator of the logic methods that write a job's inputs and start it: if anything fails before the
    job starts (a bad argument found after the volume was written, a command that cannot start), the job
    folder and the input copies in it are deleted."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        self._unstartedJobDirs = []
        try:
            return method(self, *args, **kwargs)
        except BaseException:
            for path in self._unstartedJobDirs:
                shutil.rmtree(path, ignore_errors=True)
            raise
        finally:
            self._unstartedJobDirs = []

    return wrapper


class BackendRunner:
    """Starts backend commands for a logic class.

    scene: MRML scene (default ``slicer.mrmlScene`` at call time). python: the child's Python (default
    :func:`backend.pythonExecutable`). workDir: base of job folders and default outputs (default None:
    :func:`backend.workDirectory`, read at each job, so the "Job folder" setting changed in either module
    applies to the next job of both). device: ``--device`` value, "auto" | "cuda" | "cpu", or None (default:
    ``--device`` is left out and the backend's default applies, see ``medssl info --defaults``).
    """

    keepJobFiles = None
    """False: a job's folder is deleted once its results are in the scene or it was cancelled, and only its
    log.txt stays after a failure. True: outputs and logs stay. None (default): the modules' "Keep job
    outputs and logs" setting, read at each job (:func:`backend.keepJobFilesSetting`; False outside Slicer).
    Input copies (patient data) are deleted when the job ends either way."""

    def __init__(self, scene=None, python: str | None = None, workDir: str | None = None, device: str | None = None):
        self._scene = scene
        self.python = python
        self.workDir = workDir
        self.device = device
        self.extraEnvironment: dict = {}
        self.lastJob: jobs.Job | None = None
        self.lastOutputs: dict = {}  # nodes made by the last finished job, by role

    @property
    def scene(self):
        return nodes.getScene(self._scene)

    def command(self, subcommand: str, *args) -> list[str]:
        """argv of ``python -m MedSSL <subcommand> <args>`` for this logic's Python.

        Long jobs also get ``--parent-pid``: the child exits when this process dies (it runs in its own
        process group so Cancel can end the whole tree, which would otherwise let it outlive Slicer).
        """
        if subcommand in ("pretrain", "finetune", "predict", "suggest"):
            args = (*args, "--parent-pid", os.getpid())
        return backend.command(subcommand, *args, python=self.python)

    def newJobDirectory(self, kind: str) -> str:
        path = backend.newJobDirectory(kind, self.workDir)
        self.__dict__.setdefault("_unstartedJobDirs", []).append(path)
        return path

    def defaultOutputDirectory(self, jobDir: str, kind: str) -> str:
        """``<workDir>/models/<job folder name>``: models outlive job folders."""
        return os.path.join(self.workDir or backend.workDirectory(), "models", os.path.basename(jobDir))

    def run(self, jobDir: str, commands, onFinished, blocking: bool, onEvent=None, cleanupPaths=()):
        """Start ``commands`` in ``jobDir``; ``onFinished(job)`` imports the results (on the thread that polls).

        blocking=True: wait and return ``onFinished``'s value (raises :class:`jobs.JobError` with the
        backend's one-line reason on failure). blocking=False: return the started :class:`jobs.Job`; the
        caller polls it (``job.poll()`` from a timer) and may ``job.cancel()``.
        """
        job = jobs.Job(commands, jobDir, env=backend.childEnvironment(self.extraEnvironment),
                       onFinished=onFinished, onEvent=onEvent)
        job.cleanupPaths = list(cleanupPaths)
        job.keepFiles = backend.keepJobFilesSetting() if self.keepJobFiles is None else bool(self.keepJobFiles)
        self.lastJob = job
        job.start()
        if jobDir in self.__dict__.get("_unstartedJobDirs", []):
            self._unstartedJobDirs.remove(jobDir)
        return job.wait() if blocking else job

    @staticmethod
    def checkVolume(volumeNode) -> None:
        """Raise ``ValueError`` unless ``volumeNode`` is a scalar volume node with voxels."""
        if volumeNode is None or not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
            raise ValueError("select a scalar volume")
        if volumeNode.GetImageData() is None:
            raise ValueError(f"volume '{volumeNode.GetName()}' has no voxels")

    @staticmethod
    def checkModel(modelDir) -> str:
        """Absolute path of a model bundle folder or .pt file; ``ValueError`` when it does not exist."""
        if not modelDir or not os.path.exists(str(modelDir)):
            raise ValueError(f"model not found: {modelDir}")
        return os.path.abspath(str(modelDir))
