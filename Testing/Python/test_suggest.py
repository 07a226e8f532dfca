"""medssl suggest: uncertainty-ranked slices, valid indices, annotated slices left out, LPS centres."""

import json

import numpy as np
import torch

from MedSSL.commands.cli import main
from MedSSL.tasks.infer.suggest import annotated_slices, rank_slices
from MedSSL.io.volumes import read_volume, to_sitk, write_volume
from finetune_helpers import OBLIQUE, blobs_ct, segment_bundle, volume

torch.set_num_threads(1)


def test_ranking_picks_the_most_uncertain_slices_and_skips_annotated_ones():
    grid = volume(np.zeros((10, 8, 12), np.int16), spacing=(1.0, 2.0, 3.0), origin=(5.0, 6.0, 7.0), direction=OBLIQUE)
    entropy = np.zeros((10, 8, 12), np.float32)
    for k, value in [(3, 0.9), (4, 0.8), (7, 0.5), (9, 0.7)]:
        entropy[:, :, k] = value
    ranked = rank_slices(entropy, grid, count=3)
    assert [s["index"] for s in ranked] == [3, 4, 9]
    assert [s["score"] for s in ranked] == sorted((s["score"] for s in ranked), reverse=True)
    assert all(s["axis"] == 2 for s in ranked)
    exclude = np.zeros(12, bool)
    exclude[3] = True
    assert [s["index"] for s in rank_slices(entropy, grid, 2, exclude=exclude)] == [4, 9]
    assert [s["index"] for s in rank_slices(entropy, grid, 3, min_gap=2)] == [3, 9, 7]
    centre = to_sitk(grid).TransformContinuousIndexToPhysicalPoint([4.5, 3.5, 3.0])
    assert np.allclose(ranked[0]["center_mm"], centre, atol=1e-3)
    other = rank_slices(entropy, grid, 2, axis=0)
    assert all(s["axis"] == 0 and 0 <= s["index"] < 10 for s in other)


def test_annotated_slices_rule():
    """Whole painted planes count; a plane painted along another axis only crosses the others (a line)."""
    painted = np.full((4, 4, 6), 255, np.uint8)
    painted[:, :, 2] = 0
    painted[:, :, 4] = 0
    painted[1, 1, 4] = 1
    painted[3] = 0  # a sagittal plane: it crosses every axial slice in a line
    assert annotated_slices(painted, 2).tolist() == [False, False, True, False, True, False]
    assert annotated_slices(painted, 0).tolist() == [False, False, False, True]
    exported = np.zeros((4, 4, 6), np.uint8)  # a segmentation export without 255: slices with a class count
    exported[0, 0, 5] = 3
    assert annotated_slices(exported, 2).tolist() == [False] * 5 + [True]


def test_suggest_cli_prints_and_writes_valid_slices(tmp_path, capsys):
    segment_bundle(tmp_path / "m", values=(0, 1), patch=(16, 16, 8))
    image, labels = blobs_ct((24, 20, 14), seed=2)
    ref = volume(image, spacing=(1.5, 1.5, 2.5), origin=(1.0, 2.0, 3.0), direction=OBLIQUE)
    write_volume(ref, tmp_path / "ct.nii.gz")
    painted = np.full(labels.shape, 255, np.uint8)
    painted[:, :, [4, 9]] = labels[:, :, [4, 9]]
    write_volume(ref.with_array(painted), tmp_path / "painted.nii.gz")
    assert main(["suggest", "--device", "cpu", "--model", str(tmp_path / "m"), "--image", str(tmp_path / "ct.nii.gz"), "--count", "4",
                 "--label", str(tmp_path / "painted.nii.gz"), "--out", str(tmp_path / "s" / "sug.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((tmp_path / "s" / "sug.json").read_text(encoding="utf-8"))
    assert printed == written
    slices = written["slices"]
    assert len(slices) == 4 and len({s["index"] for s in slices}) == 4
    assert all(s["axis"] == 2 and 0 <= s["index"] < 14 and s["index"] not in (4, 9) for s in slices)
    assert [s["score"] for s in slices] == sorted((s["score"] for s in slices), reverse=True)
    grid = read_volume(tmp_path / "ct.nii.gz")
    for s in slices:
        expected = to_sitk(grid).TransformContinuousIndexToPhysicalPoint([11.5, 9.5, float(s["index"])])
        assert np.allclose(s["center_mm"], expected, atol=1e-3)


def test_suggest_progress_json_ends_with_done(tmp_path, capsys):
    segment_bundle(tmp_path / "m", values=(0, 1), patch=(16, 16, 8))
    image, _ = blobs_ct((16, 16, 10), seed=1)
    write_volume(volume(image), tmp_path / "ct.nrrd")
    assert main(["suggest", "--device", "cpu", "--model", str(tmp_path / "m"), "--image", str(tmp_path / "ct.nrrd"), "--count", "2",
                 "--progress", "json"]) == 0
    last = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert last["event"] == "done" and len(last["outputs"]["slices"]) == 2
