"""model.json as :class:`MedSSL.io.bundle.BundleMeta`: today's version-1 files load and round-trip unchanged,
newer or foreign formats and wrongly typed values are refused in one line naming the file, and every writer's
output parses."""

import json

import numpy as np
import pytest
import torch

from MedSSL.commands.cli import main
from MedSSL.data.phantom import make_phantom
from MedSSL.errors import MedSSLError
from MedSSL.io.bundle import ABSENT, BundleMeta, read_bundle_meta, read_meta, save_bundle
from MedSSL.io.volumes import write_volume
from MedSSL.models.genesis_unet import GenesisUNet
from finetune_helpers import volume

torch.set_num_threads(1)

#: model.json of ``medssl finetune --engine network --init PRETRAINED --steps 1 --patch 16 16 16`` on a 32 x 32 x 16
#: phantom, written by the release before BundleMeta (json.dumps(meta, indent=2) of this dict, in this key order)
SEGMENT_V1 = {'format': 'medssl-bundle',
 'format_version': 1,
 'architecture': {'name': 'unet3d', 'width': 4, 'in_channels': 1, 'out_channels': 9, 'spatial_dims': 3},
 'task': 'segment',
 'method': {'name': 'finetune', 'init_method': 'genesis'},
 'init': {'source': 'bundle', 'width': 4, 'method': 'genesis', 'task': 'pretrain'},
 'preprocessing': {'intensity': {'modality': 'CT', 'ct_window': [-1000.0, 1000.0], 'mr_percentiles': [0.5, 99.5]},
                   'target_spacing_mm': None,
                   'modality': 'CT'},
 'patch_size': [16, 16, 16],
 'training': {'steps': 1,
              'stopped_by': 'steps',
              'batch_size': 2,
              'optimizer': 'adam',
              'lr': 0.001,
              'max_time_s': None,
              'best_val_loss': None,
              'seed': 0,
              'device': 'cpu',
              'seconds': 0.2},
 'history': [{'step': 1,
              'loss': 3.6643564701080322,
              'lr': 0.001,
              'dice_loss': 0.9684683680534363,
              'ce': 2.695888042449951}],
 'world_size': 1,
 'classes': {'1': {'name': 'label_1', 'color': [0.9, 0.35, 0.3]},
             '2': {'name': 'label_2', 'color': [0.35, 0.7, 0.35]},
             '3': {'name': 'label_3', 'color': [0.3, 0.5, 0.9]},
             '4': {'name': 'label_4', 'color': [0.95, 0.8, 0.25]},
             '5': {'name': 'label_5', 'color': [0.65, 0.4, 0.8]},
             '6': {'name': 'label_6', 'color': [0.3, 0.8, 0.8]},
             '7': {'name': 'label_7', 'color': [0.95, 0.55, 0.2]},
             '8': {'name': 'label_8', 'color': [0.6, 0.8, 0.3]}},
 'channels': [0, 1, 2, 3, 4, 5, 6, 7, 8],
 'detection': False,
 'inference': {'overlap': 0.5, 'blend': 'gaussian'},
 'transfer': 'all',
 'batchnorm': 'running statistics from training',
 'fewshot': {'annotation': 'dense',
             'sampling': 'class-balanced: an annotated voxel of each channel in turn, within 40% of the patch around '
                         'its centre, anywhere along the painted axis',
             'painted_axis': None,
             'augmentation': {'p_affine': 0.5,
                              'rotate_deg': 15.0,
                              'scale': [0.85, 1.15],
                              'flip_axes': [],
                              'contrast': [0.97, 1.03],
                              'brightness': 0.01,
                              'gamma': [1.0, 1.0],
                              'noise_std': 0.005},
             'loss': 'dice+ce, not-annotated (255) voxels masked',
             'postprocess': {'connected_to_annotation': False}},
 'data_summary': {'volumes': 1,
                  'shapes': [[32, 32, 16]],
                  'spacings_mm': [[4.0, 4.0, 6.0]],
                  'annotations': [{'kind': 'dense', 'fraction': 1.0}],
                  'modalities': {'CT': 1},
                  'class_voxels': {'1': 938, '2': 70, '3': 52, '4': 47, '5': 749, '6': 759, '7': 71, '8': 14}},
 'versions': {'medssl': '0.1.0', 'torch': '2.13.0+cpu', 'monai': '1.6.1'}}


def bundle_with(folder, content: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.json").write_text(json.dumps(content, indent=2), encoding="utf-8")
    return folder


def refusal(folder) -> str:
    with pytest.raises(MedSSLError) as caught:
        read_bundle_meta(folder)
    message = str(caught.value)
    assert "\n" not in message and str(folder / "model.json") in message
    return message


def test_a_version_1_model_json_loads_and_round_trips_to_the_same_text(tmp_path):
    folder = bundle_with(tmp_path / "b", SEGMENT_V1)
    meta = read_bundle_meta(folder)
    assert json.dumps(meta.to_json(), indent=2) == (folder / "model.json").read_text(encoding="utf-8")
    assert read_meta(folder) == SEGMENT_V1
    assert meta.architecture.out_channels == 9 and meta.spatial_dims == 3 and meta.patch == (16, 16, 16)
    assert meta.channel_values == list(range(9)) and meta.class_table[8]["name"] == "label_8"
    assert meta.inference_setting("overlap") == 0.5 and meta.inference_setting("window") is None
    assert meta.transfer == "all" and meta.extra == {}


def test_keys_an_old_bundle_lacks_get_the_readers_defaults_and_are_not_written_back(tmp_path):
    old = {k: v for k, v in SEGMENT_V1.items() if k not in ("patch_size", "channels", "inference")}
    old["architecture"] = {"name": "unet3d", "width": 4, "out_channels": 9}
    old["transfer"] = None  # a null stays a null
    old["from_a_method"] = {"kept": [1, 2]}  # a key BundleMeta does not know round-trips
    meta = read_bundle_meta(bundle_with(tmp_path / "b", old))
    assert meta.patch_size is ABSENT and meta.patch == (64, 64, 32)
    assert meta.spatial_dims == 3 and meta.in_channels == 1 and meta.channel_values == list(range(9))
    assert meta.transfer is None and meta.extra == {"from_a_method": {"kept": [1, 2]}}
    assert meta.to_json() == old


def test_a_newer_format_version_is_refused_naming_the_file(tmp_path):
    message = refusal(bundle_with(tmp_path / "b", {**SEGMENT_V1, "format_version": 2}))
    assert "format version 2 is newer" in message


def test_another_format_is_refused_naming_the_file(tmp_path):
    assert "not a MedSSL model.json" in refusal(bundle_with(tmp_path / "b", {**SEGMENT_V1, "format": "monai-bundle"}))
    assert "format_version" in refusal(bundle_with(tmp_path / "c", {**SEGMENT_V1, "format_version": "1"}))


@pytest.mark.parametrize("change, named", [
    ({"architecture": "unet3d"}, "no architecture"),
    ({"architecture": {"name": 3, "width": 4}}, "architecture.name is 3, expected a string"),
    ({"architecture": {"name": "unet3d", "width": "4"}}, "architecture.width"),
    ({"task": ["segment"]}, "task"),
    ({"patch_size": "64"}, "patch_size"),
    ({"channels": [0, 1.5]}, "channels"),
    ({"world_size": True}, "world_size"),
    ({"classes": [["1", "liver"]]}, "classes"),
])
def test_a_value_of_the_wrong_type_is_refused_in_one_line(tmp_path, change, named):
    assert named in refusal(bundle_with(tmp_path / "b", {**SEGMENT_V1, **change}))


def test_save_bundle_refuses_what_would_not_load(tmp_path):
    with pytest.raises(MedSSLError, match="patch_size"):
        save_bundle(tmp_path / "b", GenesisUNet(width=4).state_dict(),
                    {"architecture": {"name": "unet3d", "width": 4}, "patch_size": ["64"]})
    assert not (tmp_path / "b" / "model.json").exists()


def test_a_method_s_fields_replace_the_trainers_and_merge_into_the_architecture():
    meta = BundleMeta.from_json(SEGMENT_V1, "model.json")
    merged = meta.merged({"task": "pretrain", "architecture": {"out_channels": 3}, "own": 1}, "bundle_meta()")
    assert merged.task == "pretrain" and merged.architecture.out_channels == 3 and merged.architecture.width == 4
    assert merged.extra == {"own": 1}
    with pytest.raises(MedSSLError, match="bundle_meta\\(\\): detection"):
        meta.merged({"detection": "no"}, "bundle_meta()")


def check_written(folder) -> BundleMeta:
    """The bundle in ``folder`` parses and BundleMeta writes back exactly its model.json content."""
    data = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    meta = BundleMeta.from_json(data, folder / "model.json")
    assert meta.to_json() == data
    return meta


def test_every_writer_s_output_parses(tmp_path):
    """pretrain, finetune (segment, classify) and the few-shot engine, each as tiny as it runs."""
    ph = make_phantom(0, shape=(32, 32, 16), spacing=(4.0, 4.0, 6.0))
    (tmp_path / "data").mkdir()
    write_volume(ph.image, tmp_path / "data" / "img.nii.gz")
    write_volume(ph.labels, tmp_path / "lab.nii.gz")
    quiet = ["--device", "cpu", "--progress", "none", "--threads", "1", "--batch-size", "2"]
    assert main(["pretrain", "--device", "cpu", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "pre"), "--cache",
                 str(tmp_path / "cache"), "--steps", "2", "--width", "4", "--patch", "16", "16", "16", *quiet]) == 0
    pre = check_written(tmp_path / "pre")
    assert pre.task == "pretrain" and pre.method_name == "genesis" and pre.world_size == 1
    assert main(["finetune", "--device", "cpu", "--engine", "network", "--image", str(tmp_path / "data" / "img.nii.gz"), "--label",
                 str(tmp_path / "lab.nii.gz"), "--init", str(tmp_path / "pre"), "--steps", "1", "--patch", "16", "16",
                 "16", "--bn-recalibration", "0", "--out", str(tmp_path / "seg"), *quiet]) == 0
    seg = check_written(tmp_path / "seg")
    # a segmentation bundle of today is a cohort model: version 1's keys and the choices it made ("cohort")
    assert set(seg.to_json()) == set(SEGMENT_V1) | {"cohort"} and seg.init["method"] == "genesis"
    assert seg.cohort["completion"]["engine"] == "few-shot"

    rows = ["image,label"]
    for i in range(4):
        image = np.random.default_rng(i).normal(0, 15, (12, 12, 8)) + (500 if i % 2 else 0)
        write_volume(volume(image.astype(np.int16), spacing=(2.0, 2.0, 3.0)), tmp_path / f"v{i}.nii.gz")
        rows.append(f"v{i}.nii.gz,{'lesion' if i % 2 else 'normal'}")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    assert main(["finetune", "--device", "cpu", "--task", "classify", "--csv", str(tmp_path / "train.csv"), "--out", str(tmp_path / "cls"),
                 "--width", "4", "--patch", "8", "8", "8", "--steps", "1", *quiet]) == 0
    cls = check_written(tmp_path / "cls")
    assert cls.task == "classify" and cls.output_values == [0, 1] and cls.input_fit == "resize"

    painting = np.full(ph.labels.shape, 255, np.uint8)
    painting[:, :, [4, 10]] = (ph.labels.array[:, :, [4, 10]] > 0).astype(np.uint8)
    write_volume(ph.labels.with_array(painting), tmp_path / "painted.nii.gz")
    assert main(["finetune", "--device", "cpu", "--image", str(tmp_path / "data" / "img.nii.gz"), "--label", str(tmp_path / "painted.nii.gz"),
                 "--out", str(tmp_path / "few"), "--steps", "5", "--progress", "none"]) == 0
    few = check_written(tmp_path / "few")
    assert few.task == "fewshot" and few.architecture.name == "fewshot-appearance" and few.architecture.backbone_width is None
