"""Common base of the MedSSL logic classes: settings, job folders, and the blocking / non-blocking switch.

Qt-free; the scene is ``slicer.mrmlScene`` unless one is given.
"""

from __future__ import annotations

import os

from . import backend, jobs, nodes


class BackendRunner:
    """Starts backend commands for a logic class.

    scene: MRML scene (default ``slicer.mrmlScene`` at call time). python: the child's Python (default
    :func:`backend.pythonExecutable`). workDir: base of job folders and default outputs (default
    :func:`backend.workDirectory`). device: ``--device`` value, "auto" | "cuda" | "cpu".
    """

    def __init__(self, scene=None, python: str | None = None, workDir: str | None = None, device: str = "auto"):
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
        return backend.newJobDirectory(kind, self.workDir)

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
        self.lastJob = job
        job.start()
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
