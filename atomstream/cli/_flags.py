"""Flag helpers shared by the commands: defaults shown from the config models, and the nearest flag for a typo.

Defaults live in one place, the frozen pydantic configs (``models.config``, ``streamer.service.config``). A flag that
sets a config field defaults to ``None`` — "not given", so the config's own default applies — and its help shows that
default, read from the model when the help is printed. The read is lazy because the configs import torch (through
``streamer.maps.preprocess``), which ``atomstream --help`` or ``atomstream serve`` on a CPU install should not pay for.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["ConfigDefault", "check_flags", "config_flag", "from_config", "in_flags", "show_default"]


def show_default(value: Any) -> str:
    """How a default reads in help text: tuples as ``a,b``, None as ``none``."""
    if value is None:
        return "none"
    if isinstance(value, tuple | list):
        return ",".join(show_default(v) for v in value)
    return str(value)


class ConfigDefault:
    """The default of ``field`` at ``where`` (``"module:Name"``), looked up on ``str()``: a field of a pydantic model,
    or a keyword parameter of a function (for commands whose library takes keywords rather than a config)."""

    def __init__(self, where: str, field: str, shown: Callable[[Any], str] = show_default) -> None:
        self.where, self.field, self.shown = where, field, shown

    @property
    def value(self) -> Any:
        module, _, name = self.where.partition(":")
        owner = getattr(importlib.import_module(module), name)
        fields = getattr(owner, "model_fields", None)
        if fields is not None:
            return fields[self.field].get_default(call_default_factory=True)
        return inspect.signature(owner).parameters[self.field].default

    def __str__(self) -> str:
        return self.shown(self.value)


def config_flag(
    group: Any,
    *flags: str,
    where: str,
    field: str,
    help: str,
    shown: Callable[[Any], str] = show_default,
    **kwargs: Any,
) -> argparse.Action:
    """``group.add_argument(*flags, default=None, ...)`` whose help ends ``(default: <the config's default>)``.

    ``default=argparse.SUPPRESS`` may be passed for a field where None is a value (absent then means not given).
    """
    kwargs.setdefault("default", None)
    action = group.add_argument(*flags, help=f"{help} (default: %(config_default)s)", **kwargs)
    action.config_default = ConfigDefault(where, field, shown)  # read by argparse's "%(...)s" help expansion
    return action


def from_config(args: argparse.Namespace, names: dict[str, str]) -> dict[str, Any]:
    """``{field: value}`` for the flags that were given (not None): ``names`` maps namespace attribute -> field."""
    return {field: getattr(args, attr) for attr, field in names.items() if getattr(args, attr) is not None}


def in_flags(message: str, names: dict[str, str]) -> str:
    """A library or pydantic message in the CLI's words: ``field=value`` (optionally ``section.field=value``) becomes
    ``--flag value`` for each ``attr -> field`` in ``names``. Libraries name their parameters, the CLI its flags."""
    for attr, field in names.items():
        flag = "--" + attr.replace("_", "-")
        message = re.sub(rf"\b(?:[a-z_]+\.)?{re.escape(field)}=", f"{flag} ", message)
    return message


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def check_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """Refuse an unknown ``--flag`` before parsing, with the (sub)command's usage and the nearest real flag.

    argparse would report it only after the required options (and then with the top-level usage), so a typo such as
    ``--epohcs`` would read as "--data is required". Unique prefixes stay allowed, as argparse allows them.
    """
    current = parser
    for token in argv:
        if token == "--":
            return
        children = _subparsers(current)
        if token in children:
            current = children[token]
            continue
        if not token.startswith("--") or token in ("--help", "--version"):
            continue
        name = token.split("=", 1)[0]
        known = [s for s in current._option_string_actions if s.startswith("--")]
        if name in known or len([s for s in known if s.startswith(name)]) == 1:
            continue
        near = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]}?" if near else f"; see `{current.prog} --help`"
        current.error(f"unrecognized argument {name}{hint}")
