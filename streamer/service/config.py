"""Configuration of ``atomstream serve``: one frozen, typo-proof object built from defaults, a YAML file, the
environment and command-line flags.

Precedence, highest first: values passed in (the CLI flags), ``ATOMSTREAM_…`` environment variables (nested fields
with ``__``, e.g. ``ATOMSTREAM_CURVE__SERVER_SECRET_FILE``), the YAML file given to ``ServiceConfig.load`` (``--config
serve.yaml``), then the defaults below. Endpoints default to loopback: exposing the service is a deliberate choice.
A port of ``0`` or ``*`` in an endpoint (or ``metrics_port=0``) binds a free port; the service reports the actual one.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from streamer.wire.protocol import MAX_CONTROL_BYTES, MAX_FRAME_BYTES
from streamer.wire.security import CurveConfig, is_loopback

__all__ = ["ConfigError", "ServiceConfig"]

_YAML_FILE: contextvars.ContextVar[Path | None] = contextvars.ContextVar("atomstream_serve_yaml", default=None)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file or field and the value."""


class ServiceConfig(BaseSettings):
    """Settings of the streaming service (``atomstream serve``)."""

    model_config = SettingsConfigDict(
        env_prefix="ATOMSTREAM_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
    )

    artifact: Path | None = Field(None, description="exported artifact directory (manifest.json + encoder files)")
    backend: Literal["onnx", "torchscript"] = Field("onnx", description="which encoder file of the artifact to run")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available, else CPU")
    ingest: str = Field("tcp://127.0.0.1:5555", description="PULL endpoint the service binds for frames")
    publish: str = Field("tcp://127.0.0.1:5556", description="PUB endpoint the service binds for maps and events")
    publish_connect: bool = Field(
        False,
        description="connect the PUB socket to publish (a proxy's XSUB, DESIGN.md 'Scaling out') instead of binding",
    )
    publish_reliable: str | None = Field(
        None,
        description="extra XPUB endpoint the service binds whose subscribers get every message: a subscriber send_hwm "
        "behind stops ingest (back-pressure) instead of losing messages; null: off",
    )
    control: str = Field("tcp://127.0.0.1:5557", description="REP endpoint the service binds for commands")
    metrics_host: str = Field("127.0.0.1", description="HTTP host of /metrics, /healthz, /readyz")
    metrics_port: int | None = Field(9108, ge=0, le=65535, description="0: a free port; null: no HTTP endpoint")
    max_batch_patches: int = Field(1024, ge=1, description="most patches per encoder call (across frames)")
    frame_encoder: bool = Field(
        True,
        description="encode a grid frame of at least half a batch of patches from the frame itself when the artifact "
        "has encoder.frame.onnx (ONNX Runtime on the CPU), in bands of whole grid rows, instead of cutting its "
        "patches; false: always cut (the same maps, to float rounding)",
    )
    intra_op_threads: int | None = Field(
        None,
        ge=1,
        description="ONNX Runtime CPU threads; null: min(4, the CPUs this process may use). Fewer can be faster on a "
        "machine shared with other busy processes",
    )
    max_wait_ms: float = Field(2.0, ge=0, description="how long a partial batch waits for more frames")
    queue_size: int = Field(16, ge=1, description="frames accepted but not yet encoded, at most")
    overload: Literal["block", "drop_oldest"] = Field(
        "block", description="full queue: block (back-pressure to the producer) or drop the oldest frame"
    )
    recv_hwm: int = Field(16, ge=1, description="ZeroMQ receive high-water mark of the ingest socket (messages)")
    send_hwm: int = Field(1000, ge=1, description="ZeroMQ send high-water mark of the publish socket (messages)")
    max_frame_bytes: int = Field(
        MAX_FRAME_BYTES,
        ge=1,
        description="larger frames are refused: declared larger, frame_too_large; sent larger, the ingest socket "
        "(ZMQ_MAXMSGSIZE) drops the connection before the bytes are held",
    )
    max_queue_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1,
        description="bytes of accepted frames waiting for the encoder, at most (beside queue_size): one producer of "
        "big frames cannot hold more than this ahead of everyone else's frames; one frame is always let in",
    )
    max_control_bytes: int = Field(
        MAX_CONTROL_BYTES, ge=256, description="largest control request; the control socket drops larger ones unread"
    )
    max_open_scans: int = Field(
        1024,
        ge=1,
        description="scans counted at once (scan_start without scan_end yet); a new scan beyond this is refused with "
        "an overloaded error, never by forgetting a live one (scans idle for scan_idle_s make room)",
    )
    scan_idle_s: float = Field(600.0, gt=0, description="an open scan with no message for this long may be forgotten")
    max_scan_id_chars: int = Field(256, ge=1, description="longer scan ids are refused (bad_header)")
    artifact_roots: list[Path] | None = Field(
        None,
        description="directories that reload may load artifacts from (anything under them); null: the directory "
        "holding `artifact`, or no reload at all when the service was given no artifact path",
    )
    max_artifact_bytes: int = Field(
        2 * 1024**3, ge=1, description="an artifact whose files add up to more is refused before it is read"
    )
    reload_timeout_s: float = Field(
        120.0, gt=0, description="a reload not finished by then is answered as failed; the old model keeps serving"
    )
    reliable_timeout_s: float = Field(
        2.0,
        gt=0,
        description="how long a publish_reliable subscriber may hold ingest back; after that its messages are "
        "dropped (counted in atomstream_reliable_dropped_total) for 10x this long instead of freezing ingest",
    )
    insecure: bool = Field(
        False, description="allow non-loopback binds without CURVE (anyone who can connect may inject and command)"
    )
    defect_classes: list[str | int] | None = Field(
        None, description="class names or indices flagged as defects; null: the manifest's defect_classes"
    )
    defect_threshold: float = Field(0.5, ge=0, le=1, description="defect score at which a patch is flagged")
    connectivity: Literal[4, 8] = Field(8, description="grid neighbours joining flagged patches into one region")
    defect_max_share: float = Field(
        0.05, gt=0, le=1, description="regions over this share of a frame's patches are withheld, not published"
    )
    status_interval_s: float = Field(1.0, gt=0, description="seconds between status heartbeats")
    linger_ms: int = Field(1000, ge=0, description="on shutdown, how long queued published messages may take")
    drain_timeout_s: float = Field(30.0, gt=0, description="on shutdown, how long in-flight frames may take")
    curve: CurveConfig | None = Field(None, description="CurveZMQ encryption and client authorisation; null: off")

    @field_validator("ingest", "publish", "control", "publish_reliable")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            raise ValueError(f"endpoint {value!r} needs a transport, e.g. 'tcp://127.0.0.1:5555'")
        return value

    @property
    def exposed_endpoints(self) -> list[str]:
        """Bound endpoints reachable from other machines (not loopback, ipc or inproc)."""
        bound = [self.ingest, self.control, self.publish_reliable] + ([] if self.publish_connect else [self.publish])
        return [e for e in bound if e is not None and not is_loopback(e)]

    @model_validator(mode="after")
    def _secure_or_local(self) -> ServiceConfig:
        """Without CURVE, anyone who can reach a port may inject frames and reload models: only loopback, unless
        the operator says ``insecure`` on purpose."""
        exposed = self.exposed_endpoints
        if self.curve is None and exposed and not self.insecure:
            raise ValueError(
                f"endpoint(s) {', '.join(exposed)} listen beyond loopback without CURVE, so anyone on the network "
                "could inject frames, read maps and reload models; configure curve (see `atomstream keys`), bind "
                "127.0.0.1, or pass --insecure (insecure: true) if the network itself is trusted"
            )
        return self

    @model_validator(mode="after")
    def _connectable(self) -> ServiceConfig:
        """A connecting PUB needs a real peer address, and the proxy it connects to does not speak CURVE."""
        if not self.publish_connect:
            return self
        if self.publish.endswith((":0", ":*")):
            raise ValueError(
                f"publish {self.publish!r} with publish_connect: a connect needs the proxy's actual port, not 0 or *"
            )
        if self.curve is not None:
            raise ValueError(
                "publish_connect with curve: the proxy does not speak CURVE, so the connection would fail silently; "
                "bind publish (publish_connect false) and let the proxy connect upstream, or turn curve off"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_file = _YAML_FILE.get()
        if yaml_file is None:
            return (init_settings, env_settings)
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))

    @classmethod
    def load(cls, *, config_file: Path | None = None, overrides: Mapping[str, Any] | None = None) -> ServiceConfig:
        """Defaults < ``config_file`` (YAML) < environment < ``overrides``; ``ConfigError`` names what is wrong."""
        if config_file is not None and not Path(config_file).is_file():
            raise ConfigError(f"config file {str(config_file)!r} does not exist; give the path of a YAML file")
        token = _YAML_FILE.set(Path(config_file) if config_file is not None else None)
        try:
            return cls(**dict(overrides or {}))
        except ValidationError as exc:
            where = f" (from {config_file})" if config_file is not None else ""
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise ConfigError(
                f"invalid serve configuration{where}: field {field!r}={first.get('input')!r}: {first['msg']}"
            ) from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(config_file)!r} is not valid YAML: {exc}") from None
        finally:
            _YAML_FILE.reset(token)
