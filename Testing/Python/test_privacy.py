"""No patient identifier and no input path in anything MedSSL writes or prints (except stderr errors)."""

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from MedSSL.commands.cli import main
from MedSSL.data.phantom import make_phantom

torch.set_num_threads(1)
MARKER = "ZZPHIMARKER42"


def write_dicom_series(volume_hu: np.ndarray, folder: Path, spacing, patient_name: str) -> None:
    """Write (X, Y, Z) int16 HU as a CT DICOM series whose PatientName/PatientID carry ``patient_name``."""
    folder.mkdir(parents=True)
    image = sitk.GetImageFromArray(volume_hu.transpose(2, 1, 0).astype(np.int16))
    image.SetSpacing(spacing)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.42"
    for k in range(image.GetDepth()):
        sl = image[:, :, k]
        tags = {
            "0008|0060": "CT", "0010|0010": patient_name, "0010|0020": f"{patient_name}-ID",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1.41", "0020|000e": series_uid,
            "0020|0013": str(k + 1), "0020|0032": f"0\\0\\{k * spacing[2]}", "0020|0037": "1\\0\\0\\0\\1\\0",
            "0008|0018": f"{series_uid}.{k + 1}", "0028|1053": "1", "0028|1052": "0",
        }
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)


def write_on_series_grid(labels, series, path):
    """Write ``labels`` (X, Y, Z) uint8 on the grid of the DICOM ``series`` folder to ``path``; returns it."""
    image = sitk.GetImageFromArray(labels.transpose(2, 1, 0))
    reference = sitk.ImageSeriesReader()
    reference.SetFileNames(reference.GetGDCMSeriesFileNames(str(series)))
    image.CopyInformation(reference.Execute())
    sitk.WriteImage(image, str(path))
    return path


def test_no_marker_in_outputs(tmp_path, capsys):
    phantom = make_phantom(3, shape=(48, 48, 24), spacing=(4.0, 4.0, 6.0))
    series = tmp_path / f"{MARKER}_patient" / "series"
    write_dicom_series(phantom.image.array, series, (4.0, 4.0, 6.0), MARKER)
    from MedSSL.io.volumes import read_volume

    assert read_volume(series).modality == "CT"
    tiny = ["--width", "4", "--patch", "32", "32", "16", "--progress", "json"]
    cache, bundle, model = tmp_path / "cache", tmp_path / "bundle", tmp_path / "model"
    assert main(["pretrain", "--device", "cpu", "--data", str(series.parent), "--out", str(bundle), "--cache", str(cache),
                 "--steps", "3", "--batch-size", "2", "--cubes-per-volume", "4", *tiny]) == 0
    label = np.full(phantom.labels.shape, 255, np.uint8)
    label[:, :, 12] = (phantom.labels.array[:, :, 12] == 1).astype(np.uint8)
    label_path = write_on_series_grid(label, series, tmp_path / f"{MARKER}_label.nii.gz")
    assert main(["finetune", "--engine", "network", "--device", "cpu", "--image", str(series), "--label", str(label_path), "--init", str(bundle),
                 "--out", str(model), "--steps", "2", *tiny]) == 0
    report = tmp_path / "report"
    report.mkdir()
    assert main(["predict", "--device", "cpu", "--model", str(model), "--image", str(series), "--out", str(report / "pred.nii.gz"),
                 "--detections", str(report / "det.json"), "--progress", "json"]) == 0
    assert main(["evaluate", "--pred", str(report / "pred.nii.gz"), "--truth", str(label_path),
                 "--json", str(report / "scores.json"), "--figure", str(report / "scores.png")]) == 0
    printed = capsys.readouterr()
    leaks = [line for line in (printed.out + printed.err).splitlines() if MARKER in line]
    assert not leaks
    for folder in (cache, bundle, model, report):
        for path in folder.rglob("*"):
            if path.is_file():
                assert MARKER.encode() not in path.read_bytes(), f"{path} carries the marker"
    meta = json.loads((model / "model.json").read_text(encoding="utf-8"))
    assert MARKER not in json.dumps(meta) and str(tmp_path) not in json.dumps(meta)


def test_few_shot_and_suggest_write_and_print_no_marker(tmp_path, capsys):
    """The few-shot path (a painting fitted by the engine, then predict --annotation to NRRD and NIfTI) and
    suggest, on a DICOM series whose PatientName/PatientID and folder carry the marker: no file written
    (bundle, NRRD/NIfTI headers, JSON) and no progress line holds the marker or an input path."""
    phantom = make_phantom(4, shape=(32, 32, 16), spacing=(6.0, 6.0, 8.0))
    series = tmp_path / f"{MARKER}_patient" / "series"
    write_dicom_series(phantom.image.array, series, (6.0, 6.0, 8.0), MARKER)
    painting = np.full(phantom.labels.shape, 255, np.uint8)
    for k in (5, 9):  # two axial planes of the liver
        painting[:, :, k] = (phantom.labels.array[:, :, k] == 1).astype(np.uint8)
    label_path = write_on_series_grid(painting, series, tmp_path / f"{MARKER}_painting.nrrd")
    written = tmp_path / "written"
    model = written / "model"
    assert main(["finetune", "--device", "cpu", "--image", str(series), "--label", str(label_path), "--out", str(model),
                 "--progress", "json"]) == 0
    assert json.loads((model / "model.json").read_text(encoding="utf-8"))["task"] == "fewshot"
    for name in ("pred.nrrd", "pred.nii.gz"):
        assert main(["predict", "--device", "cpu", "--model", str(model), "--image", str(series), "--annotation",
                     str(label_path), "--out", str(written / name), "--progress", "json"]) == 0
    assert main(["finetune", "--engine", "network", "--device", "cpu", "--image", str(series), "--label", str(label_path),
                 "--out", str(written / "network"), "--width", "4", "--steps", "2", "--patch", "16", "16", "8",
                 "--progress", "json"]) == 0
    assert main(["suggest", "--device", "cpu", "--model", str(written / "network"), "--image", str(series), "--label",
                 str(label_path), "--count", "2", "--out", str(written / "slices.json"), "--progress", "json"]) == 0
    printed = capsys.readouterr().out
    assert '"slices"' in printed and '"event": "done"' in printed
    leaks = [line for line in printed.splitlines() if MARKER in line]  # both input paths hold the marker
    assert not leaks, leaks
    files = [path for path in written.rglob("*") if path.is_file()]
    assert {"pred.nrrd", "pred.nii.gz", "slices.json", "model.json"} <= {path.name for path in files}
    for path in files:
        data = path.read_bytes()
        assert MARKER.encode() not in data and str(tmp_path).encode() not in data, f"{path} carries the marker or a path"
