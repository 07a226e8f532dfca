"""The README and docs/ keep their promises about the command line and their links: every ``medssl ...``
command in a bash code block (also ``python -m MedSSL``, ``torchrun ... -m MedSSL``) parses with the real
CLI's argparse parser (nothing is run), and every relative link or image points to a file of the tree,
and a ``#fragment`` to a heading of that file. Only the Markdown files present in the tree are read."""

import re
import shlex
from pathlib import Path

import pytest

from MedSSL.commands.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^```(\w*)")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)\)")
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}


def markdown_files():
    """README.md, Testing/Benchmarks/README.md and every .md under docs/ (paths relative to the repo)."""
    files = [REPO / "README.md", REPO / "Testing" / "Benchmarks" / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    return [f.relative_to(REPO).as_posix() for f in files if f.is_file()]


def split_blocks(text: str):
    """(language, lines of the block) for each fenced code block, and the prose lines outside them."""
    blocks, prose, current, language = [], [], None, ""
    for line in text.splitlines():
        fence = FENCE.match(line.strip())
        if fence and current is None:
            current, language = [], fence.group(1)
        elif fence:
            blocks.append((language, current))
            current = None
        elif current is not None:
            current.append(line)
        else:
            prose.append(line)
    return blocks, prose


def medssl_commands(lines):
    """The medssl argument lists of a shell block: continuation lines joined, comments dropped; the
    arguments after ``medssl`` or ``-m MedSSL``."""
    joined, pending = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    for command in joined:
        words = shlex.split(command, comments=True)
        for start, word in enumerate(words):
            if word == "medssl" or (word == "MedSSL" and start and words[start - 1] == "-m"):
                yield command.strip(), words[start + 1:]
                break


def documented_commands():
    for name in markdown_files():
        blocks, _ = split_blocks((REPO / name).read_text(encoding="utf-8"))
        for language, lines in blocks:
            if language in SHELL_BLOCKS:
                for command, argv in medssl_commands(lines):
                    yield pytest.param(argv, id=f"{name}: {command[:80]}")


@pytest.mark.parametrize("argv", list(documented_commands()))
def test_documented_command_parses(argv, capsys):
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"medssl {' '.join(argv)}: argparse refused it ({capsys.readouterr().err.strip()}, status {exc.code})")
    assert args.command, argv


def test_the_docs_hold_medssl_commands():
    """The collector finds the commands it should: the README's quick start alone has several per command."""
    commands = {argv[0] for argv in (p.values[0] for p in documented_commands())}
    assert {"pretrain", "finetune", "predict", "evaluate", "suggest", "demo"} <= commands


def test_a_bad_option_fails_to_parse():
    """The check above can fail: an option the CLI does not have is refused."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["predict", "--model", "m", "--image", "i", "--out", "o", "--no-such-option"])


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown text: lower case, punctuation dropped, spaces to -."""
    _, prose = split_blocks(text)
    anchors = set()
    for line in prose:
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            title = re.sub(r"[^\w\- ]", "", match.group(1).lower())
            anchors.add(title.replace(" ", "-"))
    return anchors


def relative_links(name: str):
    _, prose = split_blocks((REPO / name).read_text(encoding="utf-8"))
    for line in prose:
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):
                yield target


@pytest.mark.parametrize("name", markdown_files())
def test_relative_links_resolve(name):
    source = REPO / name
    broken = []
    for target in relative_links(name):
        path, _, fragment = target.partition("#")
        resolved = (source.parent / path).resolve() if path else source
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif fragment and resolved.suffix == ".md" and fragment not in heading_anchors(resolved.read_text(encoding="utf-8")):
            broken.append(f"{target}: no heading #{fragment} in {resolved.relative_to(REPO)}")
    assert not broken, f"{name}: " + "; ".join(broken)


def test_link_check_sees_a_broken_link(tmp_path):
    """heading_anchors and the link pattern find what the check relies on."""
    assert "speed-from-painted-label-to-result" in heading_anchors("## Speed: from painted label to result\n")
    assert LINK.findall("see [a](docs/x.md#y) and ![b](Resources/c.png)") == ["docs/x.md#y", "Resources/c.png"]


RUNTIME = ["--device", "cpu", "--seed", "1", "--progress", "none"]
MINIMAL = {"pretrain": ["--data", "d", "--out", "o"], "finetune": ["--image", "i", "--label", "l", "--out", "o"],
           "predict": ["--model", "m", "--image", "i", "--out", "o"], "suggest": ["--model", "m", "--image", "i"],
           "demo": [], "evaluate": ["--pred", "p", "--truth", "t"], "info": ["bundle"], "methods": []}


@pytest.mark.parametrize("command", ["pretrain", "finetune", "predict", "suggest", "demo"])
def test_commands_that_run_a_model_take_device_seed_and_progress(command):
    """The README: pretrain, finetune, predict, suggest and demo take --progress, --device and --seed."""
    args = build_parser().parse_args([command, *MINIMAL[command], *RUNTIME])
    assert (args.device, args.seed, args.progress) == ("cpu", 1, "none")


@pytest.mark.parametrize("command", ["evaluate", "info", "methods"])
def test_evaluate_info_and_methods_take_no_device(command, capsys):
    """The README: evaluate, info and methods take none of them (the README once said every command did)."""
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, *MINIMAL[command], "--device", "cpu"])
    assert "unrecognized arguments: --device" in capsys.readouterr().err


def command_options():
    """(command, --flag) for every visible option of every sub-command of the real parser."""
    import argparse

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in subparsers.choices.items():
        for action in parser._actions:
            if action.help != argparse.SUPPRESS:
                for flag in action.option_strings:
                    if flag.startswith("--") and flag != "--help":
                        yield name, flag


def test_every_option_is_documented_in_cli_md():
    """docs/cli.md names every option `medssl COMMAND --help` lists (hidden ones aside)."""
    text = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    missing = sorted({f"{name} {flag}" for name, flag in command_options() if not re.search(re.escape(flag) + r"(?![\w-])", text)})
    assert not missing, f"options missing from docs/cli.md: {missing}"
