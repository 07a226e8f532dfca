"""MedSSL backend: self-supervised pretraining and few-shot fine-tuning of 3D medical image models.

Pure Python (torch, MONAI, SimpleITK, numpy). Never imports ``slicer``, ``qt`` or ``vtk``:
the Slicer modules run this package in a child process through ``python -m MedSSL``.
"""

__version__ = "0.1.0"
