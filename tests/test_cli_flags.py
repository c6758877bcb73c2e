"""Every flag of every command says what it does and what it defaults to; defaults come from the configs; a typo
gets the command's usage and the nearest flag."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from atomstream.cli import build_parser, main


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    return parser._get_formatter()._expand_help(action) if action.help else ""


def test_every_flag_has_help_and_every_optional_value_a_default() -> None:
    missing = []
    for parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._VersionAction | argparse._SubParsersAction):
                continue
            text = _help(parser, action)
            name = f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
            if not text.strip():
                missing.append(f"{name}: no help")
            elif action.option_strings and action.nargs != 0 and not action.required and "default" not in text:
                missing.append(f"{name}: help shows no default")
    assert not missing, "\n".join(missing)


def test_config_flags_default_to_none_and_show_the_configs_default() -> None:
    from models.config import DataConfig, ModelConfig, TrainConfig
    from streamer.service.config import ServiceConfig

    parser = build_parser()
    train = parser.parse_args(["train", "--data", "x.npz", "--out", "run"])
    assert (train.classes, train.patch, train.epochs, train.atom_threshold) == (None, None, None, None)
    serve = parser.parse_args(["serve"])
    assert serve.queue_size is None and not hasattr(serve, "metrics_port")
    helps = {p.prog: {s: _help(p, a) for a in p._actions for s in a.option_strings} for p in _parsers(parser)}
    assert helps["atomstream train"]["--classes"].endswith(f"(default: {ModelConfig().n_classes})")
    assert helps["atomstream train"]["--patch"].endswith(f"(default: {DataConfig().patch[0]})")
    assert helps["atomstream train"]["--atom-sigma"].endswith(f"(default: {DataConfig().atom_sigma})")
    assert helps["atomstream train"]["--lr"].endswith(f"(default: {TrainConfig().lr})")
    assert helps["atomstream serve"]["--queue-size"].endswith(f"(default: {ServiceConfig().queue_size})")
    assert helps["atomstream serve"]["--ingest"].endswith(f"(default: {ServiceConfig().ingest})")


def test_serve_overrides_only_what_was_given() -> None:
    from atomstream.cli.serve import _overrides

    parser = build_parser()
    assert _overrides(parser.parse_args(["serve"])) == {}
    got = _overrides(
        parser.parse_args(["serve", "--queue-size", "3", "--metrics-port", "none", "--defect-classes", "dopant,2"])
    )
    assert got == {"queue_size": 3, "metrics_port": None, "defect_classes": ["dopant", 2]}


@pytest.mark.parametrize(
    ("argv", "usage", "nearest"),
    [
        (["train", "--epohcs", "3"], "usage: atomstream train", "did you mean --epochs?"),
        (["serve", "--queue-sise", "3"], "usage: atomstream serve", "did you mean --queue-size?"),
        (["synth", "lattice", "--frams", "2", "--out", "x.npy"], "usage: atomstream synth lattice", "--frames"),
    ],
)
def test_a_typo_shows_the_commands_usage_and_the_nearest_flag(
    argv: list[str], usage: str, nearest: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage) and nearest in err


def test_a_unique_prefix_is_still_a_flag() -> None:
    from atomstream.cli._flags import check_flags

    check_flags(build_parser(), ["train", "--epo", "3"])  # argparse accepts unique prefixes; so do we
