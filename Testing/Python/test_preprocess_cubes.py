"""Intensity normalisation, resampling, body masks, cube sampling and the cube cache."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from MedSSL.data.cube_sampling import sample_cubes
from MedSSL.data.cube_set import CubeSet
from MedSSL.data.cubes import CubeSettings, cache_key, default_cache_dir, prepare_cubes
from MedSSL.data.phantom import make_phantom, write_phantom
from MedSSL.data.preprocess import (
    IntensityConfig,
    body_mask,
    detect_modality,
    normalize_intensity,
    resample_to_spacing,
)
from MedSSL.errors import MedSSLError
from MedSSL.io import volumes
from MedSSL.io.volumes import Volume, write_volume

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
SMALL = dict(shape=(64, 64, 32), spacing=(3.0, 3.0, 6.0))
PATCH = (32, 32, 16)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(0, **SMALL)


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantoms")
    return [write_phantom(make_phantom(s, **SMALL), folder / f"p{s}")[0] for s in range(3)]


def _geometry(array, spacing=(1.0, 1.0, 1.0), modality=None):
    return Volume(array, np.array(spacing, float), np.zeros(3), np.eye(3), modality)


def _mr_like(seed=0, shape=(40, 40, 20)):
    rng = np.random.default_rng(seed)
    a = rng.gamma(4.0, 100.0, size=shape).astype(np.float32)
    a[:5] = 0.0  # background
    return _geometry(a)


def _settings(**kw):
    base = dict(patch=PATCH, cubes_per_volume=4)
    base.update(kw)
    return CubeSettings(**base)


# ---------------------------------------------------------------------------------- intensity / modality


def test_intensity_config_round_trip_and_validation():
    cfg = IntensityConfig(modality="ct", ct_window=(-160, 240), mr_percentiles=[1, 99])
    assert cfg.modality == "CT"
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert IntensityConfig.from_dict(d) == cfg
    assert IntensityConfig.from_dict({}) == IntensityConfig()
    for bad in (dict(modality="PET"), dict(ct_window=(100, -100)), dict(mr_percentiles=(50, 10))):
        with pytest.raises(MedSSLError):
            IntensityConfig(**bad)
    with pytest.raises(MedSSLError):
        IntensityConfig.from_dict({"window": 1})


def test_detect_modality(phantom):
    ct = phantom.image
    assert detect_modality(Volume(ct.array, ct.spacing, ct.origin, ct.direction, None)) == "CT"
    assert detect_modality(_mr_like()) == "MR"
    # resampled (non-integer) CT is still CT
    assert detect_modality(_geometry(ct.array.astype(np.float32) + 0.37)) == "CT"
    # a z-scored MR with negative values is MR
    z = _mr_like().array
    assert detect_modality(_geometry((z - z.mean()) / z.std())) == "MR"
    # the DICOM modality wins
    assert detect_modality(Volume(ct.array, ct.spacing, ct.origin, ct.direction, "MR")) == "MR"


def test_normalize_ct_window(phantom):
    a, modality = normalize_intensity(phantom.image, IntensityConfig())
    assert modality == "CT" and a.dtype == np.float32 and a.shape == phantom.image.shape
    assert a.min() >= 0.0 and a.max() <= 1.0
    v = _geometry(np.array([-2000, -1000, 0, 1000, 3000], np.int16).reshape(5, 1, 1), modality="CT")
    out, _ = normalize_intensity(v, IntensityConfig())
    assert np.allclose(out.ravel(), [0.0, 0.0, 0.5, 1.0, 1.0])
    out, _ = normalize_intensity(v, IntensityConfig(ct_window=(-1000, 0)))
    assert np.allclose(out.ravel(), [0.0, 0.0, 1.0, 1.0, 1.0])


def test_normalize_mr_percentiles():
    v = _mr_like()
    a, modality = normalize_intensity(v, IntensityConfig())
    assert modality == "MR" and a.dtype == np.float32
    assert a.min() == 0.0 and a.max() == 1.0
    nonzero = a[v.array != 0]
    assert 0.003 < np.mean(nonzero == 1.0) < 0.01  # ~0.5 % clipped at the top
    assert np.all(a[:5] == 0.0)
    # forced CT on MR data and a constant image do not crash
    assert normalize_intensity(v, IntensityConfig(modality="CT"))[1] == "CT"
    const, _ = normalize_intensity(_geometry(np.full((4, 4, 4), 7.0, np.float32)), IntensityConfig(modality="MR"))
    assert np.all(const == 0)


# ---------------------------------------------------------------------------------- resampling


def test_resample_keeps_extent_and_geometry():
    direction = np.diag([-1.0, -1.0, 1.0])
    p = make_phantom(1, shape=(48, 40, 20), spacing=(2.0, 2.5, 5.0), origin=(5.0, -7.0, 11.0), direction=direction)
    out = resample_to_spacing(p.image, (3.0, 3.0, 3.0))
    assert np.allclose(out.spacing, 3.0)
    assert np.allclose(out.origin, p.image.origin) and np.allclose(out.direction, direction)
    extent_old = np.array(p.image.shape) * p.image.spacing
    extent_new = np.array(out.shape) * out.spacing
    assert np.all(np.abs(extent_new - extent_old) <= out.spacing / 2 + 1e-6)
    assert out.shape == (32, 33, 33)
    assert out.array.dtype == np.float32 and out.modality == "CT"
    labels = resample_to_spacing(p.labels, 3.0, nearest=True)
    assert labels.array.dtype == np.uint8 and labels.same_grid(out)
    assert set(np.unique(labels.array)) <= set(np.unique(p.labels.array))
    assert resample_to_spacing(p.image, None) is p.image
    with pytest.raises(MedSSLError):
        resample_to_spacing(p.image, (0, 1, 1))


def test_resample_keeps_a_one_slice_image_one_slice():
    """A radiograph (X, Y, 1) is resampled in-plane only: no slices extrapolated from nothing."""
    image = _geometry(np.arange(40 * 30, dtype=np.float32).reshape(40, 30, 1), spacing=(0.5, 0.5, 5.0))
    out = resample_to_spacing(image, (1.0, 1.0, 1.0))
    assert out.shape == (20, 15, 1) and np.allclose(out.spacing, (1.0, 1.0, 5.0))
    assert resample_to_spacing(image, (0.5, 0.5, 2.0)) is image  # only Z differs: nothing to do
    labels = resample_to_spacing(_geometry(np.ones((40, 30, 1), np.uint8), spacing=(0.5, 0.5, 5.0)), 1.0, nearest=True)
    assert labels.shape == (20, 15, 1) and labels.array.min() == 1


# ---------------------------------------------------------------------------------- body mask


def test_body_mask_excludes_air_includes_lungs(phantom):
    a, modality = normalize_intensity(phantom.image)
    mask = body_mask(a, modality)
    lab = phantom.labels.array
    assert mask.dtype == bool and mask.shape == a.shape
    assert not mask[0, 0, :].any() and not mask[-1, -1, :].any()
    lungs = (lab == 5) | (lab == 6)
    assert mask[lungs].mean() > 0.99
    assert mask[lab > 0].all()
    hu = phantom.image.array
    assert mask[hu < -950].mean() < 0.5  # lungs are inside, the air around is not
    assert 0.3 < mask.mean() < 0.8
    # MR: thresholded and filled
    mr = _mr_like()
    m01, _ = normalize_intensity(mr)
    mr_mask = body_mask(m01, "MR")
    assert not mr_mask[:5].any() and mr_mask[5:].mean() > 0.9


def test_body_mask_drops_a_separate_table(phantom):
    hu = phantom.image.array.copy()
    hu[:, -4:-2, :] = 300  # a "table" below the body (posterior = +y), not touching it
    a, _ = normalize_intensity(Volume(hu, phantom.image.spacing, phantom.image.origin, phantom.image.direction, "CT"))
    mask = body_mask(a, "CT")
    assert not mask[:, -4:-2, :].any()


# ---------------------------------------------------------------------------------- sampling


def test_cubes_respect_the_content_filter(phantom):
    a, modality = normalize_intensity(phantom.image)
    mask = body_mask(a, modality)
    cubes, corners = sample_cubes(a, mask, PATCH, 12, np.random.default_rng(0), 0.7, return_corners=True)
    assert cubes.shape == (12, *PATCH) and cubes.dtype == np.float32
    for cube, c in zip(cubes, corners):
        window = tuple(slice(o, o + p) for o, p in zip(c, PATCH))
        assert mask[window].mean() >= 0.7
        assert np.array_equal(cube, a[window])
    again = sample_cubes(a, mask, PATCH, 12, np.random.default_rng(0), 0.7)
    assert np.array_equal(again, cubes)
    # nothing in the body: no cube, after max_tries
    empty = sample_cubes(a, np.zeros_like(mask), PATCH, 5, np.random.default_rng(0), 0.5, max_tries=30)
    assert empty.shape == (0, *PATCH)


def test_small_volumes_are_padded_with_air():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.3, 1.0, size=(70, 70, 26)).astype(np.float32)
    cubes = sample_cubes(a, np.ones(a.shape, bool), (64, 64, 32), 3, rng)
    assert cubes.shape == (3, 64, 64, 32)
    assert np.all(cubes[:, :, :, :3] == 0) and np.all(cubes[:, :, :, -3:] == 0)  # 6 padded slices, 3 each side
    assert np.all(cubes[:, :, :, 3:-3] > 0)
    flat = rng.uniform(0.3, 1.0, size=(50, 80, 1)).astype(np.float32)  # a 2D image
    cubes, corners = sample_cubes(flat, np.ones(flat.shape, bool), (64, 64, 32), 2, rng, return_corners=True)
    assert cubes.shape == (2, 64, 64, 32)
    assert np.count_nonzero(cubes[0].any(axis=(0, 1))) == 1
    assert corners[0, 0] == -7 and corners[0, 2] == -15  # padded before: (64-50)//2, (32-1)//2


# ---------------------------------------------------------------------------------- cache


def test_cache_key_depends_on_content_and_settings(tmp_path, phantom_files):
    s = _settings()
    k = cache_key(phantom_files[0], s)
    assert len(k) == 64 and k == cache_key(phantom_files[0], _settings())
    assert s.key() == _settings().key()
    # a copy elsewhere has the same key; other content does not
    copy = tmp_path / "copy.nii.gz"
    copy.write_bytes(phantom_files[0].read_bytes())
    assert cache_key(copy, s) == k
    assert cache_key(phantom_files[1], s) != k
    for changed in (_settings(seed=1), _settings(cubes_per_volume=5), _settings(patch=(32, 32, 8)),
                    _settings(min_body_fraction=0.6), _settings(target_spacing_mm=4.0),
                    _settings(intensity=IntensityConfig(ct_window=(-1000, 500)))):
        assert cache_key(phantom_files[0], changed) != k
    # a DICOM-like folder: sorted files, streamed
    folder = tmp_path / "dcm"
    folder.mkdir()
    (folder / "b.dcm").write_bytes(b"2" * 3000)
    (folder / "a.dcm").write_bytes(b"1" * 3000)
    k_folder = cache_key(folder, s)
    (folder / "b.dcm").write_bytes(b"3" * 3000)
    assert cache_key(folder, s) != k_folder
    with pytest.raises(MedSSLError):
        cache_key(tmp_path / "missing.nii.gz", s)


def test_prepare_cubes_reuses_the_cache(tmp_path, phantom_files, monkeypatch):
    cache = tmp_path / "cache"
    calls = []
    first = prepare_cubes(phantom_files[:2], _settings(), cache, progress=lambda *a: calls.append(a))
    assert calls == [(1, 2, False), (2, 2, False)]
    assert len(first) == 8 and first.num_volumes == 2
    cubes = first.get(np.arange(len(first)))
    assert cubes.shape == (8, *PATCH) and cubes.dtype == np.float32
    assert 0.0 <= cubes.min() and cubes.max() <= 1.0
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".json", ".npy", ".npy"]

    def no_read(path):
        raise AssertionError("read_volume called although the cubes are cached")

    monkeypatch.setattr(volumes, "read_volume", no_read)
    calls.clear()
    second = prepare_cubes(phantom_files[:2], _settings(), cache, progress=lambda *a: calls.append(a))
    assert calls == [(1, 2, True), (2, 2, True)]
    assert np.array_equal(second.get(np.arange(len(second))), cubes)
    # another setting is another key: the image must be read again
    with pytest.raises(AssertionError):
        prepare_cubes(phantom_files[:1], _settings(seed=3), cache)


def test_cache_entry_summary_has_no_paths(tmp_path, phantom_files):
    cache = tmp_path / "cache"
    cs = prepare_cubes(phantom_files, _settings(), cache)
    summary = cs.summary()
    text = json.dumps(summary)
    assert str(tmp_path) not in text and str(phantom_files[0].parent) not in text and "p0" not in text
    assert summary["volumes"] == 3 and summary["cubes"] == 12
    assert summary["modalities"] == {"CT": 3}
    assert summary["shapes"] == [[64, 64, 32]] * 3 and summary["spacings_mm"] == [[3.0, 3.0, 6.0]] * 3
    assert all(len(i) == 12 for i in summary["ids"])
    for meta in cache.glob("*.json"):
        info = json.loads(meta.read_text(encoding="utf-8"))
        assert info["n_cubes"] == 4 and info["modality"] == "CT"
        assert str(tmp_path) not in meta.read_text(encoding="utf-8") and "p0" not in meta.read_text(encoding="utf-8")
    assert np.load(next(cache.glob("*.npy"))).dtype == np.float16


def test_split_by_volume_and_by_cube(tmp_path, phantom_files):
    cs = prepare_cubes(phantom_files, _settings(), tmp_path / "cache")
    train, val = cs.split(0.34, seed=0)
    assert len(train) + len(val) == len(cs)
    assert train.num_volumes == 2 and val.num_volumes == 1
    assert not set(train.summary()["ids"]) & set(val.summary()["ids"])
    all_cubes = cs.get(np.arange(len(cs)))
    val_cubes = val.get(np.arange(len(val)))
    for cube in val_cubes:  # each validation cube is one of the set's
        assert any(np.array_equal(cube, c) for c in all_cubes)
    assert cs.split(0.34, seed=0)[1].summary()["ids"] == val.summary()["ids"]
    assert len(cs.split(0.0)[1]) == 0
    one = prepare_cubes(phantom_files[:1], _settings(), tmp_path / "cache")
    t1, v1 = one.split(0.25, seed=1)
    assert len(t1) == 3 and len(v1) == 1
    assert not set(t1.selections[0].tolist()) & set(v1.selections[0].tolist())
    # pickling sends file names only
    assert len(pickle.dumps(cs)) < 20_000
    assert np.array_equal(pickle.loads(pickle.dumps(cs)).get([0, 5]), cs.get([0, 5]))


def test_volumes_without_cubes_are_skipped_or_refused(tmp_path, phantom_files):
    air = tmp_path / "air.nii.gz"
    write_volume(_geometry(np.full((40, 40, 20), -1000, np.int16), modality="CT"), air)
    messages = []
    cs = prepare_cubes([air, phantom_files[0]], _settings(), tmp_path / "cache", warn=messages.append)
    assert cs.num_volumes == 1 and len(messages) == 1 and "air.nii.gz" in messages[0]
    with pytest.raises(MedSSLError, match="inside the body"):
        prepare_cubes([air], _settings(), tmp_path / "cache", warn=messages.append)
    with pytest.raises(MedSSLError):
        prepare_cubes([], _settings(), tmp_path / "cache")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDSSL_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MEDSSL_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "medssl" / "cubes"


def test_settings_validation():
    assert CubeSettings.from_dict(_settings().to_dict()) == _settings()
    with pytest.raises(MedSSLError):
        CubeSettings(patch=(64, 64))
    with pytest.raises(MedSSLError):
        CubeSettings(min_body_fraction=2)
    assert isinstance(CubeSet([], []).summary(), dict)


# ---------------------------------------------------------------------------------- real data


@pytest.mark.skipif(not DATA.is_dir(), reason="shared/data is not available")
def test_real_ct_file_and_dicom_folder(tmp_path):
    spleen = DATA / "msd_spleen_ivadomed" / "sub-spleen2_ct.nii.gz"  # 26 slices: padded to 32
    dicom = DATA / "totalseg_examples" / "example_ct_dicom"
    if not (spleen.is_file() and dicom.is_dir()):
        pytest.skip("the example CT files are not available")
    settings = CubeSettings(patch=(64, 64, 32), cubes_per_volume=4)
    cs = prepare_cubes([spleen, dicom], settings, tmp_path / "cache")
    summary = cs.summary()
    assert summary["cubes"] == 8 and summary["modalities"] == {"CT": 2}
    assert summary["shapes"] == [[164, 166, 26], [512, 512, 20]]
    assert str(DATA) not in json.dumps(summary) and "spleen" not in json.dumps(summary)
    cubes = cs.get(np.arange(len(cs)))
    assert cubes.shape == (8, 64, 64, 32) and 0 <= cubes.min() and cubes.max() <= 1
    thorax = DATA / "itkelastix_thorax_ct" / "thorax_ct_00_2xdown.nii.gz"
    if thorax.is_file():
        volume = volumes.read_volume(thorax)
        a, modality = normalize_intensity(volume)
        mask = body_mask(a, modality)
        assert modality == "CT" and 0.25 < mask.mean() < 0.6
        assert not mask[:, 200:, :].any()  # the table (rows 200-250, below the back) is not body
