"""The live few-shot session (MedSSL/tasks/fewshot/session.py) and ``medssl session`` (its JSON-lines process).

The client that Slicer uses is tested against this process in MedSSLCommon/Testing/Python/test_common_session.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from MedSSL.commands.session import decode, encode
from MedSSL.data.phantom import make_phantom, write_phantom
from MedSSL.errors import MedSSLError
from MedSSL.io.volumes import write_volume
from MedSSL.tasks.fewshot.engine import FewShotSettings
from MedSSL.tasks.fewshot.session import FewShotSession, affected_slices

LIVER = 1
PLANES = (3, 10, 18)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(0, shape=(64, 64, 40))


def liver_session(phantom, planes=PLANES):
    truth = (phantom.labels.array == LIVER).astype(np.uint8)
    session = FewShotSession(phantom.image.array.astype(np.float32), phantom.image.spacing, FewShotSettings(steps=60))
    session.set_planes(2, {k: truth[..., k] for k in planes})
    return session, truth


def dice(a, b):
    return 2.0 * np.logical_and(a > 0, b > 0).sum() / ((a > 0).sum() + (b > 0).sum())


def test_affected_slices_are_the_gaps_next_to_a_changed_plane_and_the_walk_past_a_changed_end():
    planes = [5, 10, 20]
    assert affected_slices([14], [5, 10, 14, 20], 30) == list(range(11, 20))  # added inside a gap
    assert affected_slices([10], planes, 30) == list(range(6, 20))            # repainted: both gaps
    assert affected_slices([10], [5, 20], 30) == list(range(6, 20))           # removed: the merged gap
    assert affected_slices([5], planes, 30) == list(range(0, 10))             # first plane: walk below
    assert affected_slices([25], [5, 10, 20, 25], 30) == list(range(21, 30))  # new last plane: walk above


def test_a_correction_never_changes_the_result_outside_the_slices_it_affects(phantom):
    session, truth = liver_session(phantom)
    first = session.update()
    assert first.mode == "full" and first.box[2][1] > 0
    assert dice(session.labels, truth) > 0.85
    before = session.labels.copy()
    session.set_planes(2, {7: truth[..., 7]})  # a plane added between 3 and 10
    update = session.update()
    assert update.mode == "incremental"
    assert update.slices == list(range(4, 10))
    changed = np.flatnonzero((before != session.labels).any(axis=(0, 1)))
    assert changed.size and set(changed) <= set(update.slices)
    box = tuple(slice(a, b) for a, b in update.box)
    np.testing.assert_array_equal(update.labels, session.labels[box])  # the answer is the changed box
    outside = np.ones(before.shape, bool)
    outside[box] = False
    np.testing.assert_array_equal(before[outside], session.labels[outside])
    np.testing.assert_array_equal(session.labels[..., 7], truth[..., 7])  # the painted plane is kept


def test_repainting_an_end_plane_recomputes_the_walk_past_it_only(phantom):
    session, truth = liver_session(phantom)
    session.update()
    before = session.labels.copy()
    repainted = truth[..., 18].copy()
    repainted[:, :30] = 0  # the user erased part of the structure on the last plane
    session.set_planes(2, {18: repainted})
    update = session.update()
    assert update.mode == "incremental" and update.slices[0] == 11 and update.slices[-1] == session.frame.box[2].stop - 1
    np.testing.assert_array_equal(before[..., :11], session.labels[..., :11])
    assert not np.array_equal(before[..., 18], session.labels[..., 18])
    assert session.update().mode == "unchanged"  # nothing painted since: nothing recomputed


def test_a_correction_past_the_region_of_interest_recomputes_features_but_stays_local(phantom):
    session, truth = liver_session(phantom)
    messages = []
    session.log = messages.append
    session.update()
    before, box = session.labels.copy(), session.frame.box
    plane = truth[..., 7].copy()
    plane[56:62, 2:8] = LIVER  # a stroke far from the structure: the region of interest must grow
    session.set_planes(2, {7: plane})
    update = session.update()
    assert update.mode == "incremental" and session.frame.box != box
    assert any("features computed again" in m for m in messages)
    changed = np.flatnonzero((before != session.labels).any(axis=(0, 1)))
    assert changed.size and set(changed) <= set(range(4, 10))


def test_a_new_axis_or_class_makes_a_full_update(phantom):
    session, truth = liver_session(phantom)
    session.update()
    plane = truth[32].copy()
    session.set_planes(0, {32: plane})  # a sagittal plane joins the axial ones
    assert session.update().mode == "full"
    session.clear_planes(0, [32])
    assert session.update().mode == "full"


def test_bad_planes_name_the_plane(phantom):
    session, _ = liver_session(phantom)
    with pytest.raises(MedSSLError, match="plane 3 along axis 2: shape"):
        session.set_planes(2, {3: np.zeros((5, 5), np.uint8)})
    with pytest.raises(MedSSLError, match="plane 99 along axis 2: outside"):
        session.set_planes(2, {99: np.zeros((64, 64), np.uint8)})
    empty = FewShotSession(np.zeros((8, 8, 8), np.float32), (1, 1, 1))
    with pytest.raises(MedSSLError, match="no painted plane"):
        empty.update()


def test_payload_round_trip():
    array = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    np.testing.assert_array_equal(decode(encode(array), "x"), array)
    with pytest.raises(MedSSLError, match="y: malformed labels payload"):
        decode({"shape": [2], "data": "!!"}, "y")


def start(args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "MedSSL", "session", "--device", "cpu", *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_session_process_answers_json_lines_and_survives_bad_commands(phantom, tmp_path):
    image, _, _ = write_phantom(phantom, tmp_path)
    truth = (phantom.labels.array == LIVER).astype(np.uint8)
    painting = np.full(truth.shape, 255, np.uint8)
    painting[..., list(PLANES)] = truth[..., list(PLANES)]
    painted = tmp_path / "painted.nii.gz"
    write_volume(phantom.labels.with_array(painting), painted)
    commands = [{"cmd": "planes", "axis": 2, "id": 1, "planes": [{"index": k, "labels": encode(truth[..., k])} for k in PLANES]},
                "not json", {"cmd": "fly", "id": 2}, {"cmd": "planes", "axis": 5, "id": 3},
                {"cmd": "update", "id": 4}, {"cmd": "painting", "path": str(painted), "id": 5}, {"cmd": "update", "id": 6}, {"cmd": "close"}]
    process = start(["--image", str(image), "--fewshot-steps", "40"])
    out, err = process.communicate("\n".join(c if isinstance(c, str) else json.dumps(c) for c in commands) + "\n", timeout=300)
    assert process.returncode == 0, err
    events = lines(out)
    assert events[0]["event"] == "ready" and events[0]["shape"] == [64, 64, 40]
    answers = {e.get("id"): e for e in events if e["event"] in ("ok", "result", "error")}
    assert answers[1]["event"] == "ok"
    assert [e["event"] for e in events if e["event"] == "error" and e.get("id") is None] == ["error"]  # not json
    assert "unknown command 'fly'" in answers[2]["message"] and '"axis" 5' in answers[3]["message"]
    result = answers[4]
    got = np.zeros((64, 64, 40), np.uint8)
    got[tuple(slice(a, b) for a, b in result["box"])] = decode(result["labels"], "result")
    assert result["mode"] == "full" and dice(got, truth) > 0.85
    assert answers[5]["event"] == "ok" and answers[6]["mode"] == "unchanged"  # the same painting, from a file
    assert events[-1] == {"event": "closed", "reason": "close"}
    assert str(tmp_path) not in out  # no patient paths in what the session prints


def test_session_process_ends_at_end_of_input_and_when_idle(phantom, tmp_path):
    image, _, _ = write_phantom(phantom, tmp_path)
    process = start(["--image", str(image)])
    out, _ = process.communicate("", timeout=120)
    assert process.returncode == 0 and lines(out)[-1] == {"event": "closed", "reason": "end of input"}
    process = start(["--image", str(image), "--idle-timeout", "0.5"])
    out = process.stdout.read()  # stdin stays open: the idle timeout ends it
    assert process.wait(timeout=120) == 0 and lines(out)[-1] == {"event": "closed", "reason": "idle"}
    process.stdin.close()
    process.stderr.close()


def test_session_bad_image_is_one_line_exit_2(tmp_path):
    process = start(["--image", str(tmp_path / "missing.nrrd")])
    out, err = process.communicate("", timeout=120)
    assert process.returncode == 2 and out == ""
    assert err.startswith("medssl: error:") and "missing.nrrd" in err and len(err.strip().splitlines()) == 1


def test_the_first_result_is_the_engines_own(phantom):
    from MedSSL.tasks.fewshot.engine import segment_painted

    session, truth = liver_session(phantom)
    session.update()
    _, result = segment_painted(session.image, session.spacing, session.painting, session.settings)
    np.testing.assert_array_equal(session.labels, result.labels)
