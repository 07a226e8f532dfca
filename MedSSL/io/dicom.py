"""DICOM series folders (one series per folder) and the modality tag, read with SimpleITK."""

from __future__ import annotations

import os
from pathlib import Path

import SimpleITK as sitk

from MedSSL.errors import MedSSLError


def dicom_series(folder: Path) -> list[str]:
    """The DICOM series ids found directly in ``folder`` (empty when none or unreadable)."""
    reader = sitk.ImageSeriesReader()
    try:
        return list(reader.GetGDCMSeriesIDs(str(folder)) or [])
    except RuntimeError:
        return []


def modality_from_metadata(image: sitk.Image) -> str | None:
    """"CT" or "MR" from the image's DICOM Modality tag (0008,0060); None when absent or another modality."""
    if image.HasMetaDataKey("0008|0060"):
        value = image.GetMetaData("0008|0060").strip().upper()
        if value in ("CT", "MR"):
            return value
    return None


def read_dicom_series(folder: Path) -> tuple[sitk.Image, str | None]:
    """The one DICOM series of ``folder`` and its modality ("CT", "MR" or None); MedSSLError naming the
    folder when it holds no series, several series, or an unreadable one."""
    series = dicom_series(folder)
    if not series:
        raise MedSSLError(f"{os.fspath(folder)}: a folder with no DICOM series")
    if len(series) > 1:
        raise MedSSLError(
            f"{os.fspath(folder)}: holds {len(series)} DICOM series ({', '.join(s[-12:] for s in series[:4])}...); "
            "put one series per folder"
        )
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    reader.LoadPrivateTagsOff()
    try:
        image = reader.Execute()
    except RuntimeError:
        raise MedSSLError(f"{os.fspath(folder)}: the DICOM series cannot be read") from None
    modality = None
    try:
        value = reader.GetMetaData(0, "0008|0060").strip().upper()
        modality = value if value in ("CT", "MR") else None
    except RuntimeError:
        pass
    return image, modality
