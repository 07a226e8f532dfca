"""Each option's default is written once, in a settings dataclass: the CLI's defaults, the config a command
builds from a command line without options, and ``medssl info --defaults`` (read by the Slicer modules)
all come from it. These fail if a default diverged between the dataclass and the CLI."""

import dataclasses
import json

import pytest

from MedSSL.commands import finetune as finetune_command
from MedSSL.commands.cli import build_parser, main
from MedSSL.commands.common import training_config
from MedSSL.errors import MedSSLError
from MedSSL.engine.loop import UNBOUNDED_STEPS, LoopConfig
from MedSSL.tasks import FinetuneConfig, PretrainConfig

PRETRAIN = ["pretrain", "--data", "x.nii.gz", "--out", "b"]
FINETUNE = ["finetune", "--image", "x.nii.gz", "--label", "y.nii.gz", "--out", "b"]


def parse(argv):
    return build_parser().parse_args(argv)


def test_the_per_command_defaults_the_cli_has_always_had():
    pretrain = training_config(PretrainConfig, parse(PRETRAIN), data=["x.nii.gz"], datasets=None, out="b")
    assert (pretrain.loop.steps, pretrain.batch_size, pretrain.loop.lr, pretrain.patch, pretrain.width) == \
        (1000, 6, 1e-3, (64, 64, 32), 32)
    finetune = finetune_command.config_from_args(parse(FINETUNE))
    assert (finetune.loop.steps, finetune.batch_size, finetune.loop.lr, finetune.patch, finetune.width) == \
        (500, 2, 1e-3, None, None)


@pytest.mark.parametrize("cls,argv", [(PretrainConfig, PRETRAIN), (FinetuneConfig, FINETUNE)])
def test_a_command_line_without_options_gives_the_dataclass_defaults(cls, argv):
    config = training_config(cls, parse(argv), **({"data": ["x.nii.gz"], "datasets": None} if cls is PretrainConfig
                                                    else {}), out="b")
    for f in dataclasses.fields(cls):
        if f.name in ("data", "datasets", "out", "images", "labels"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert getattr(config, f.name) == default, f.name


def test_steps_left_out_with_max_time_is_unbounded_and_checked():
    args = parse([*PRETRAIN, "--max-time", "5"])
    assert training_config(PretrainConfig, args, data=["x"], datasets=None, out="b").loop.steps == UNBOUNDED_STEPS
    with pytest.raises(MedSSLError, match=r"^--steps 0: must be at least 1$"):
        LoopConfig(steps=0)
    with pytest.raises(MedSSLError, match=r"^--batch-size 0: must be at least 1$"):
        PretrainConfig(data=["x"], out="b", batch_size=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        LoopConfig().steps = 3


def test_info_defaults_is_what_the_dataclasses_say(capsys):
    assert main(["info", "--defaults"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["pretrain"]["steps"] == LoopConfig().steps == 1000
    assert shown["finetune"]["steps"] == FinetuneConfig(out="b").loop.steps == 500
    assert shown["pretrain"]["batch-size"] == PretrainConfig(data=None, out="b").batch_size == 6
    assert shown["finetune"]["batch-size"] == FinetuneConfig(out="b").batch_size == 2
    assert shown["pretrain"]["patch"] == [64, 64, 32]
    assert shown["predict"]["memory-mb"] == 1024.0 and shown["suggest"]["count"] == 5
    assert "parent-pid" not in shown["predict"]  # hidden options are not shown


def test_help_shows_the_dataclass_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default 1000, or unlimited with --max-time)" in text and "(default 64 64 32)" in text
    assert "cubes per step (default 6)" in text
