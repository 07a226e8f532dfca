"""A smoke run of every benchmark whose numbers the READMEs quote (``--quick`` and tiny sizes; seconds
each), so a README table cannot silently lose the code that made it. The real-data benchmarks read a
stand-in data root: phantoms written at the paths of the shared data folder they expect.
(bench_fewshot, the few-shot engine's benchmark, is not run here.)"""

import importlib.util
import json
import locale
import sys
from pathlib import Path

import numpy as np
import pytest

import torch
from torch.utils.flop_counter import FlopCounterMode

from MedSSL.data.phantom import make_phantom
from MedSSL.models.genesis_unet import GenesisUNet
from MedSSL.io.volumes import write_volume

BENCHMARKS = Path(__file__).resolve().parents[1] / "Benchmarks"


def bench(name):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))  # bench_methods imports bench_label_efficiency
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dice(entry) -> float:
    """A Dice from a summary table cell (a number, or a dict whose "mean" or "dice" is one)."""
    if isinstance(entry, dict):
        entry = entry.get("mean", entry.get("dice"))
    return float(entry)


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_bench_transforms_quick(capsys):
    assert bench("bench_transforms").main(["--quick", "--threads", "1"]) == 0
    result = last_json(capsys)
    assert result["benchmark"] == "transforms" and result["quick"] and result["patch"] == [32, 32, 16]
    # the rates are the counts over the times (cubes/s, ms/batch): a broken timer or count breaks them
    cubes = result["batches"] * result["batch"]
    assert result["batches"] > 0 and result["cubes_per_s"] == pytest.approx(cubes / result["seconds"], rel=1e-6)
    assert result["ms_per_batch"] == pytest.approx(1000 * result["seconds"] / result["batches"], rel=1e-6)
    stages = result["stage_ms_per_cube"]
    assert {"flip", "bezier", "inpaint", "outpaint"} <= set(stages) and all(v > 0 for v in stages.values())
    assert result["train_cubes_per_s"] == pytest.approx(result["batch"] / result["train_step_s"], rel=1e-6)
    assert result["train_parameters"] == sum(p.numel() for p in GenesisUNet(1, 1, result["width"]).parameters())


def test_bench_predict_memory_quick(capsys):
    bench("bench_predict_memory").main(["--quick"])
    result = last_json(capsys)
    assert result["benchmark"] == "predict_memory" and result["quick"]
    assert result["shape"] == [48, 48, 24] and result["memory_mb_target"] == 0.5
    assert result["voxels"] == 48 * 48 * 24
    assert result["seconds_per_megavoxel"] == pytest.approx(result["seconds"] / (result["voxels"] / 1e6), rel=0.05)
    # megabytes of a process that imported torch and ran a network: not kB (x1024), not bytes, not zero
    assert 100 < result["peak_rss_mb"] < 8000, result["peak_rss_mb"]


def test_bench_pretrain_memory_quick(capsys):
    bench("bench_pretrain_memory").main(["--quick"])
    result = last_json(capsys)
    assert result["benchmark"] == "pretrain_memory" and [r["volumes"] for r in result["results"]] == [2]
    assert result["settings"]["quick"] and result["settings"]["steps"] == 2
    run = result["results"][0]
    assert 100 < run["peak_rss_mb"] < 8000, run  # megabytes of a process that trained a network
    assert run["cube_cache_mb"] >= 0 and run["seconds"] > 0


def test_bench_speed_quick(capsys):
    assert bench("bench_speed").main(["--quick"]) == 0
    result = last_json(capsys)
    assert result["benchmark"] == "speed" and result["matmul_gflops"] > 0
    assert [(r["width"], r["classes"]) for r in result["predict"]] == [(2, 2), (2, 5)]
    for row in result["predict"]:
        # 48 x 48 x 24 in 16 x 16 x 8 windows at overlap 0.5: 5 positions per axis
        assert row["windows"] == 125 and row["mvoxels"] == pytest.approx(48 * 48 * 24 / 1e6, abs=1e-3)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            GenesisUNet(1, row["classes"], row["width"]).eval()(torch.zeros(1, 1, 16, 16, 8))
        assert row["gflop_per_window"] == pytest.approx(counter.get_total_flops() / 1e9, abs=1e-3)
        # rates are work over time (rounded in the JSON)
        rate = row["gflop_per_window"] * row["windows"] / row["network_s"]
        assert row["achieved_gflops"] == pytest.approx(rate, rel=0.1)
        assert row["s_per_mvoxel"] == pytest.approx(row["wall_s"] / row["mvoxels"], rel=0.05)
        assert 0 <= row["outside_network_share"] < 1 and row["network_s"] <= row["wall_s"]
    assert {r["kind"] for r in result["train"]} == {"pretrain", "finetune"}
    for row in result["train"]:
        assert row["precision"] == "fp32"  # 16-voxel patches train in fp32 on the CPU
        # the network's rate: the step's work over the step's time less the loader wait
        computing_s = row["step_s"] * (1 - row["loader_share"])
        assert row["achieved_gflops"] == pytest.approx(row["gflop_per_step"] / computing_s, rel=0.1)


def test_bench_precision_smoke(capsys):
    module = bench("bench_precision")
    if not module.DATA.is_dir():
        pytest.skip(f"{module.DATA} absent")
    assert module.main(["--cases", "spleen_ct", "--width", "2", "--steps", "2", "--pretrain-steps", "2"]) == 0
    result = last_json(capsys)
    assert [r["arm"] for r in result["finetune"]] == ["bf16", "fp32"] and len(result["pretrain"]) == 2
    assert result["finetune"][1]["precision"] == "fp32" and 0 <= result["finetune"][1]["dice_unpainted"] <= 1
    assert result["summary"]["predict"]["models"] == 1


@pytest.fixture
def c_locale():
    """The C locale (ASCII text files by default), as in a bare container or after a library reset it: the
    benchmarks' tables (with ± and →) must still be written."""
    previous = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    yield
    locale.setlocale(locale.LC_CTYPE, previous)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Phantoms at the shared-data paths bench_label_efficiency reads (the DICOM folder holds a NIfTI: the
    pretraining input is any folder searched for volumes); the liver stands in for the spleen (label 1)."""
    le = bench("bench_label_efficiency")
    root = tmp_path_factory.mktemp("shared_data")
    for i, relative in enumerate(le.PRETRAIN_DATA):
        path = root / relative
        if not relative.endswith(".nii.gz"):
            path = path / "series.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_volume(make_phantom(i, shape=(32, 32, 16), spacing=(6.0, 6.0, 8.0)).image, path)
    phantom = make_phantom(20, shape=(32, 32, 16), spacing=(6.0, 6.0, 8.0))
    (root / le.EVAL_FOLDER).mkdir()
    write_volume(phantom.image, root / le.EVAL_IMAGE)
    write_volume(phantom.labels.with_array((phantom.labels.array == 1).astype(np.uint8)), root / le.EVAL_LABEL)
    return root


def test_bench_label_efficiency_quick(data_root, tmp_path, capsys, c_locale):
    out = tmp_path / "out"
    status = bench("bench_label_efficiency").main([
        "--quick", "--data-root", str(data_root), "--out", str(out), "--cache", str(tmp_path / "cache"),
        "--pretrain-steps", "2", "--pretrain-width", "4", "--pretrain-patch", "16", "16", "8", "--pretrain-batch", "2",
        "--finetune-time", "1", "--official-width", "4", "--threads", "1", "--device", "cpu"])
    summary = last_json(capsys)
    assert status == 0, summary["failed_runs"]
    assert summary["benchmark"] == "label_efficiency" and summary["quick"]
    raw = summary["dice"]["raw"]["3"]  # k = 3: a Dice for every arm and the interpolation baseline
    assert {"scratch", "pretrained", "official", "interpolation"} <= set(raw)
    assert all(raw[arm] is not None for arm in ("scratch", "pretrained", "official", "interpolation")), raw
    assert all(0.0 <= dice(raw[arm]) <= 1.0 for arm in raw), raw
    # the interpolation baseline has painted planes around the hidden ones: it finds part of the organ
    assert dice(raw["interpolation"]) > 0.3, raw["interpolation"]
    assert json.loads((out / "summary.json").read_text(encoding="utf-8")) == summary
    table = (out / "table.md").read_text(encoding="utf-8")
    assert all(arm in table for arm in ("scratch", "pretrained", "official", "interpolation")), table


def test_bench_methods_quick(data_root, tmp_path, capsys, c_locale):
    out = tmp_path / "out"
    status = bench("bench_methods").main([
        "--quick", "--data-root", str(data_root), "--out", str(out), "--cache", str(tmp_path / "cache"),
        "--pretrain-steps", "2", "--finetune-steps", "2", "--width", "4", "--patch", "16", "16", "8", "--batch", "2",
        "--threads", "1", "--device", "cpu"])
    summary = last_json(capsys)
    assert status == 0, summary.get("failed_runs")
    assert summary["benchmark"] == "methods_label_efficiency" and summary["quick"] and not summary["failed"]
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text(encoding="utf-8").splitlines()]
    arms = ["scratch"] + sorted(summary["pretraining"])  # one run per arm, painted count and seed
    expected = len(arms) * len(summary["budget"]["ks"]) * len(summary["budget"]["seeds"])
    assert sorted({r["arm"] for r in runs}) == sorted(arms) and len(runs) == expected, (arms, len(runs))
    assert all(r["status"] == "ok" and 0.0 <= r["raw"]["dice"] <= 1.0 for r in runs), runs
    assert all(p["status"] == "ok" for p in summary["pretraining"].values())
    assert json.loads((out / "summary.json").read_text(encoding="utf-8")) == summary
    table = (out / "table.md").read_text(encoding="utf-8")
    assert all(arm in table for arm in arms), table
    # --report rebuilds the table from the results alone
    assert bench("bench_methods").main(["--report", "--out", str(out), "--data-root", str(data_root)]) == 0


def test_bench_cohort_quick(tmp_path, capsys):
    """Every arm of the cohort benchmark on a phantom cohort: rows per arm and test scan, Dice in 0..1, the
    summary table per arm, the files written (what docs/cohort.md quotes)."""
    arms = ["cohort", "refine", "correct1", "atlas", "engine3"]
    assert bench("bench_cohort").main(["--quick", "--arms", *arms, "engine-to", "--target", "0.5", "--cap", "2",
                                       "--out", str(tmp_path)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    rows, summary = lines[:-1], lines[-1]
    scored, counted = [r for r in rows if "dice" in r], [r for r in rows if r["arm"] == "to0.5"]
    from_nothing = [r for r in rows if r["arm"] == "engine-to0.5"]
    assert sorted({r["arm"] for r in scored}) == sorted(arms) and len(scored) == 2 * len(arms)  # 2 test scans
    assert all(0.0 <= d <= 1.0 for r in scored for d in r["dice"].values())
    assert set(summary["table"]["n=1"]) == set(arms) | {"to0.5", "engine-to0.5"} and summary["table"]["n=1"]["atlas"]["scans"] == 2
    # --target: corrected planes, worst first, until the mean Dice reaches 0.5 (at most --cap 2)
    assert len(counted) == 2 and len(from_nothing) == 2 and len(rows) == len(scored) + 4
    assert all(r["planes_to_target"] in (None, 1, 2) for r in from_nothing)
    for r in counted:
        reached = r["planes_to_target"] is not None
        assert reached == (r["dice_reached"] >= 0.5) and len(r["planes"]) == (r["planes_to_target"] if reached else 2)
    assert summary["table"]["n=1"]["to0.5"]["reached"] == sum(r["planes_to_target"] is not None for r in counted)
    assert (tmp_path / "results.jsonl").read_text(encoding="utf-8").count("\n") == len(rows)
    assert json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))["table"] == summary["table"]
    # --report: the table and figure of docs/cohort.md, from the rows just written
    assert bench("bench_cohort").main(["--report", str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "table.md").read_text(encoding="utf-8")
    assert "**phantom**" in table and all(f"| {arm} " in table.splitlines()[2] + " " for arm in arms)
    cells = table.splitlines()[4].split("|")[2:-1]
    assert [float(c.split()[0]) for c in cells] == [round(summary["table"]["n=1"][a]["dice"], 3) for a in arms]
    assert (tmp_path / "report" / "cohort.png").read_bytes()[:4] == b"\x89PNG"
    # training variants name the network's arms, not the atlas or the engine alone
    label = bench("bench_cohort").arm_label
    assert label({"arm": "cohort", "steps": 600, "lr": 0.003}) == "cohort+lr0.003+steps600"
    assert label({"arm": "atlas", "steps": 600}) == "atlas" and label({"arm": "engine3", "tilt": 15.0}) == "engine3"
    assert label({"arm": "cohort", "init": "genesis320", "transfer": "encoder"}) == "cohort+pretrained-encoder"
    assert label({"arm": "cohort", "init": "genesis320", "transfer": "all"}) == "cohort+pretrained"
    assert label({"arm": "cohort", "augment": False}) == "cohort+no-augment"
    assert label({"arm": "cohort", "augment": False, "tilt": 0.0}) == "cohort+no-augment"
    assert label({"arm": "cohort", "augment": True}) == "cohort"
    assert label({"arm": "correct1", "draft_prior": False}) == "correct1+no-prior"
    assert label({"arm": "cohort", "draft_prior": False}) == "cohort"  # the draft itself does not change
    assert label({"arm": "correct1", "draft_prior": True}) == "correct1"
    assert "to0.5: median" in table


def test_bench_cohort_held_out_subjects_are_the_same_for_every_draw_and_never_trained_on():
    """--held-out K: one fixed test set for every seed and n (the pretraining comparison pairs its scans), the
    training subjects drawn from the others, and --print-pool's list (what `medssl pretrain` reads) holds no
    held-out subject."""
    module = bench("bench_cohort")
    cases = [{"name": f"s{i:02d}", "image": Path(f"s{i:02d}_image.nii.gz")} for i in range(20)]
    args = module.parse_args(["--held-out", "8", "--test", "8"])
    pool, held_out = module.split(cases, 8)
    assert len(held_out) == 8 and len(pool) == 12 and not {c["name"] for c in pool} & {c["name"] for c in held_out}
    for seed in (0, 1, 4):
        for n in (1, 2, 4):
            train, test = module.draw(args, cases, n, seed)
            assert test == held_out and len(train) == n and all(c in pool for c in train)
    plain = module.parse_args(["--test", "4"])
    train, test = module.draw(plain, cases, 4, 0)
    assert len(test) == 4 and not {c["name"] for c in train} & {c["name"] for c in test}
    with pytest.raises(SystemExit):
        module.split(cases, 20)
    # the self-training arm's unlabelled scans: every other subject, none trained or tested on
    unlabeled = module.unlabeled_cases(cases, train, test)
    assert len(unlabeled) == 12 and not {c["name"] for c in unlabeled} & {c["name"] for c in train + test}


def test_detection_defaults_score_findings_class_by_class_and_choose_by_the_stated_rule(tmp_path):
    """A finding hits only a true component of its own class; each component counts once; the sweep counts
    per scan; the choice is the most sensitive setting within the false-positive budget."""
    from MedSSL.io.volumes import write_volume

    module = bench("bench_detection_defaults")
    phantom = make_phantom(seed=0, shape=(48, 48, 24), spacing=(4.0, 4.0, 6.0))
    truth = np.where(np.isin(phantom.labels.array, (1, 2)), phantom.labels.array, 0).astype(np.uint8)
    write_volume(phantom.labels.with_array(truth), tmp_path / "truth.nii.gz")
    case = {"name": "p0", "label": tmp_path / "truth.nii.gz"}

    def centre_of(value):
        index = np.argwhere(truth == value).mean(axis=0)
        index = np.argwhere(truth == value)[np.argmin(np.abs(np.argwhere(truth == value) - index).sum(axis=1))]
        return [float(c) for c in phantom.labels.index_to_physical(index[None].astype(float))[0]]

    found = [{"label": 1, "center_mm": centre_of(1), "score": 0.95, "volume_mm3": 5000.0},   # hit
             {"label": 1, "center_mm": centre_of(1), "score": 0.90, "volume_mm3": 4000.0},   # same component again
             {"label": 1, "center_mm": centre_of(2), "score": 0.80, "volume_mm3": 10.0},     # the other class: FP
             {"label": 2, "center_mm": centre_of(2), "score": 0.55, "volume_mm3": 50.0}]     # hit, small, doubtful
    matched, total = module.match_by_class(found, case)
    assert total == 2 and [lesion > 0 for _, lesion in matched] == [True, True, False, True]
    rows = module.sweep([(matched, total)])
    everything = next(r for r in rows if r["min_score"] == 0.0 and r["min_volume_mm3"] == 0.0 and r["cap"] is None)
    assert everything["sensitivity"] == 1.0 and everything["fp_per_scan"] == 1.0 and everything["shown_per_scan"] == 4
    strict = next(r for r in rows if r["min_score"] == 0.9 and r["min_volume_mm3"] == 0.0 and r["cap"] is None)
    assert strict["sensitivity"] == 0.5 and strict["fp_per_scan"] == 0.0
    assert module.choose(rows, max_fp=1.0)["sensitivity"] == 1.0
    assert module.choose(rows, max_fp=1.0, cap=1) == next(  # the cap held: the best of those rows
        r for r in rows if r["cap"] == 1 and r["min_score"] == 0.0 and r["min_volume_mm3"] == 0.0)
    tied = [dict(r, sensitivity=0.5, fp_per_scan=0.0) for r in rows]  # all equal: today's defaults stay
    assert module.choose(tied, max_fp=1.0) == module.default_row(tied)
    chosen = module.choose(rows, max_fp=0.0)  # the small false positive goes, the small true one stays
    assert chosen["sensitivity"] == 1.0 and chosen["fp_per_scan"] == 0.0 and chosen["min_volume_mm3"] == 20.0
    # --report: one setting for several cohorts, within the false-positive budget in every one
    scored = [{"label": f["label"], "score": f["score"], "volume_mm3": f["volume_mm3"], "component": lesion}
              for f, lesion in matched]
    clean = [dict(f, score=0.3) for f in scored if f["component"]]  # a second model, less sure, no false positive
    for name, findings in (("a", scored), ("b", clean)):
        run = {"cohort": name, "per_scan": [{"true_components": 2, "scored": findings}]}
        (tmp_path / f"{name}.json").write_text(json.dumps(run), encoding="utf-8")
    both = module.report([tmp_path / "a.json", tmp_path / "b.json"], max_fp=0.0)
    assert both["cohorts"] == ["a", "b"] and all(r["fp_per_scan"] == 0.0 for r in [both["choice"]])
    assert both["choice"]["sensitivity"] == 1.0 and both["choice"]["min_score"] <= 0.3
    assert both["choice"]["per_cohort"]["a"] == {"sensitivity": 1.0, "fp_per_scan": 0.0, "shown_per_scan": 3.0}
    assert both["default"]["per_cohort"]["b"]["sensitivity"] == 0.0  # a score of 0.5 hides the less sure model's


def test_bench_session_quick(capsys):
    """The live-session benchmark's simulated user on the phantom: a first result, 5 corrections, Dice per step."""
    assert bench("bench_session").main(["--quick"]) == 0
    result = last_json(capsys)
    row = result["rows"][0]
    assert result["benchmark"] == "session" and len(row["dice"]) == 6 and len(row["correction_s"]) == 5
    assert row["peak_mb"] > 0 and row["dice"][-1] > 0.8 and row["scratch_dice"] > 0.8
