"""Reference pages generated from the code: the wire messages and the configuration.

Message formats and configuration are defined once, as pydantic models; these pages are rendered from those models
(``atomstream docs``) and a test fails when the committed pages drift from the code, so the documentation cannot lie.
"""

from __future__ import annotations

import inspect
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic.fields import FieldInfo

__all__ = ["config_reference", "protocol_reference", "render_model", "write_reference"]

PAGES = {"protocol.md": "protocol_reference", "configuration.md": "config_reference"}


def _type_name(annotation: object) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(repr(a).replace("'", '"') for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        return f"`{field.default_factory()!r}`"  # type: ignore[call-arg]
    value = field.default
    if isinstance(value, BaseModel):
        return f"see `{type(value).__name__}`"
    return f"`{value!r}`"


def render_model(model: type[BaseModel], *, env_prefix: str | None = None) -> str:
    """One markdown section: the model's docstring and a table of its fields."""
    own = model.__dict__.get("__doc__")  # not the inherited pydantic docstring
    doc = inspect.cleandoc(own) if own else ""
    lines = [f"### `{model.__name__}`", ""]
    if doc:
        lines += [doc, ""]
    columns = ["field", "type", "default", "description"] + (["environment"] if env_prefix is not None else [])
    lines += [_row(columns), _row(["---"] * len(columns))]
    for name, field in model.model_fields.items():
        cells = [f"`{field.alias or name}`", _type_name(field.annotation), _cell(_default(field))]
        cells.append(_cell(field.description or ""))
        if env_prefix is not None:
            cells.append(f"`{env_prefix}{name.upper()}`")
        lines.append(_row(cells))
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """A table cell: a ``|`` inside it would end the cell early and shift every column after it."""
    return text.replace("\\|", "|").replace("|", "\\|").replace("\n", " ")


def _row(cells: list[str]) -> str:
    """One markdown table row: the header, the separator and every row share this, so their cell counts agree."""
    return "| " + " | ".join(cells) + " |"


def protocol_reference() -> str:
    from streamer.wire import protocol as p

    sections = [
        ("Ingest (PUSH → service PULL): `[header, *buffers]`", [p.ScanStart, p.Frame, p.ScanEnd]),
        (
            "Publish (service PUB → SUB): `[topic, header, *buffers]`, topic = `kind`",
            [p.Maps, p.ArraySpec, p.ModelRef, p.Defects, p.Defect, p.Error, p.Status, p.ScanSummary],
        ),
        (
            "Control (REQ → service REP): one JSON frame each way",
            [p.StatusCommand, p.ReloadCommand, p.SetCommand, p.ControlReply],
        ),
    ]
    out = [
        "# Wire protocol v1 (generated from `streamer/wire/protocol.py` — do not edit)",
        "",
        (p.__doc__ or "").strip(),
        "",
        f"Supported dtypes: {', '.join(f'`{d}`' for d in p.SUPPORTED_DTYPES)}. "
        f"Error reasons: {', '.join(f'`{r}`' for r in p.REASONS)}. "
        f"Header limit {p.MAX_HEADER_BYTES} bytes; default frame limit {p.MAX_FRAME_BYTES} bytes.",
        "",
    ]
    for title, models in sections:
        out += [f"## {title}", ""]
        out += [render_model(m) for m in models]
    return "\n".join(out)


def config_reference() -> str:
    out = ["# Configuration (generated from the pydantic models — do not edit)", ""]
    try:
        from streamer.service.config import ServiceConfig
    except ImportError:  # pragma: no cover - the service is optional in a partial install
        ServiceConfig = None  # type: ignore[assignment,misc]
    if ServiceConfig is not None:
        prefix = ServiceConfig.model_config.get("env_prefix", "ATOMSTREAM_")
        out += [
            "## `atomstream serve`",
            "",
            "Precedence: command-line flags, then environment variables, then the YAML file given by `--config`, "
            "then these defaults. Nested fields use `__` in environment variables.",
            "",
            render_model(ServiceConfig, env_prefix=prefix),
        ]
        for name, field in ServiceConfig.model_fields.items():
            for arg in typing.get_args(field.annotation) or (field.annotation,):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    out.append(render_model(arg, env_prefix=f"{prefix}{name.upper()}__"))
    from models.config import Annealing, DataConfig, ModelConfig, RunConfig, TrainConfig
    from streamer.maps.preprocess import Preprocessing

    out += ["## Training runs (`config.json` of a run directory)", ""]
    out += [render_model(m) for m in (RunConfig, ModelConfig, TrainConfig, Annealing, DataConfig, Preprocessing)]
    return "\n".join(out)


def write_reference(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, func in PAGES.items():
        path = directory / filename
        path.write_text(globals()[func]())
        written.append(path)
    return written
