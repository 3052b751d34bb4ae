"""Agent configuration: one TOML file, validated by pydantic, every field overridable from the environment.

Precedence (highest first): environment variables ``CV_WORKER_<SECTION>__<FIELD>`` (``CV_WORKER_<FIELD>`` for
top-level fields), the TOML file, then the defaults below. The file is found through ``--config PATH``, then
``CV_WORKER_CONFIG``, then ``/etc/cv-worker/config.toml``; a missing *default* file just means "all defaults",
a missing file that was asked for by name is an error.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from pathlib import Path
from typing import Any, Optional

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from accelerators.config import AcceleratorsConfig
from agent.httpapi.config import HttpConfig
from agent.inference.config import InferenceConfig
from agent.streams.config import StatsConfig, StreamConfig, StreamLimitsConfig
from agent.trainer.config import TrainConfig, TrainerConfig
from models.config import ModelsConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Raspberry Pi OS bullseye ships 3.9
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/cv-worker/config.toml")
ENV_CONFIG = "CV_WORKER_CONFIG"
ENV_PREFIX = "CV_WORKER_"

# A token that is safe as one MQTT topic level, a file name and a journal field value.
SAFE_TOKEN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ConfigError(Exception):
    """The configuration cannot be loaded; ``errors`` lists ``(field path, message)`` pairs."""

    def __init__(self, source: str, errors: list[tuple[str, str]]):
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  {path}: {msg}" for path, msg in errors)
        super().__init__(f"invalid configuration ({source}):\n{lines}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MqttConfig(_Section):
    host: Optional[str] = Field(
        None, description="Broker host name or address. Empty: the broker advertised over mDNS (`_mqtt._tcp`), "
        "else localhost."
    )
    port: Optional[int] = Field(None, ge=1, le=65535, description="Broker port (default 8883 with TLS, else 1883).")
    username: Optional[str] = Field(None, description="MQTT user name.")
    password_file: Optional[Path] = Field(
        None, description="File holding the MQTT password (kept out of the config so the config can be world-readable)."
    )
    password: Optional[SecretStr] = Field(
        None, description="The password itself; prefer `password_file`. Never printed, never advertised."
    )
    tls_ca: Optional[Path] = Field(None, description="CA bundle that signed the broker's certificate; enables TLS.")
    tls_cert: Optional[Path] = Field(None, description="Client certificate for mutual TLS.")
    tls_key: Optional[Path] = Field(None, description="Private key of `tls_cert`.")
    tls_insecure: bool = Field(False, description="Skip the broker host-name check (testing only).")
    keepalive: int = Field(30, ge=5, le=3600, description="MQTT keepalive, seconds.")
    topic_prefix: str = Field("cvw/v1", description="Root of every topic this node uses.")
    client_id: Optional[str] = Field(None, description="MQTT client id; default `cvw-<node_id>`.")
    session_expiry_s: int = Field(
        7 * 24 * 3600,
        ge=0,
        description="How long the broker keeps this node's session (and the jobs sent to it) while it is away.",
    )
    will_delay_s: int = Field(5, ge=0, le=3600, description="Delay before the broker publishes the offline will.")
    receive_maximum: int = Field(
        100, ge=1, le=65535, description="Unacknowledged requests the broker may send at once."
    )
    reconnect_min_s: float = Field(
        1.0, gt=0, description="Shortest reconnect delay. The n-th failed attempt in a row waits a random time "
        "between this and this × 2ⁿ (at most `reconnect_max_s`); a successful connection starts again from here."
    )
    reconnect_max_s: float = Field(
        15.0, gt=0, description="Longest reconnect delay: after a long broker outage the node is back at most this "
        "long after the broker, and a fleet's reconnects are spread evenly over it (1000 nodes: about 70 "
        "connections a second at 15 s). Longer (the old 60 s) leaves nodes idle for up to a minute with the broker "
        "up; much shorter makes a large fleet hit a broker that has just started all at once."
    )

    @field_validator("topic_prefix")
    @classmethod
    def _prefix_is_plain(cls, v: str) -> str:
        if not v or any(c in v for c in "#+\0") or v.startswith("/") or v.endswith("/") or v.startswith("$"):
            raise ValueError("must be a plain topic path such as 'cvw/v1' (no wildcards, no leading '$' or '/')")
        return v

    @model_validator(mode="after")
    def _tls_pairs(self) -> "MqttConfig":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.password_file is not None and self.password is not None:
            raise ValueError("give either password or password_file, not both")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None

    @property
    def effective_port(self) -> int:
        return self.port or (8883 if self.tls else 1883)

    def read_password(self) -> Optional[str]:
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is not None:
            return self.password_file.read_text().strip()
        return None


class JobsConfig(_Section):
    workers: int = Field(2, ge=1, le=64, description="Jobs that may run at the same time.")
    max_payload_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest accepted request payload.")
    max_queued: int = Field(
        1000, ge=1, description="Jobs that may wait in the queue; beyond, requests are REJECTED with `queue_full` "
        "(control jobs such as `node.info` and `job.cancel` are always taken)."
    )
    status_expiry_s: int = Field(
        3600, ge=60, description="MQTT message expiry of retained job status messages. The broker drops a job's "
        "retained status this long after its last change; with `retention_count` it keeps the retained statuses of "
        "a node (at most about `retention_count` + queued jobs) under a default mosquitto's `max_queued_messages` "
        "(1000) for a controller that subscribes with a wildcard. A controller that was away longer asks the node "
        "(re-send the request, or `job.result`)."
    )
    retention_count: int = Field(
        500, ge=1, description="Finished jobs kept in local state (with their result logs and outputs); older ones "
        "are pruned, leaving a tombstone, and their retained status is cleared from the broker."
    )
    retention_days: float = Field(7.0, gt=0, description="Finished jobs older than this are pruned.")
    tombstone_days: float = Field(
        30.0, gt=0, description="How long a pruned job's id is remembered (its final state and version): a request "
        "re-sent with that id is answered with the old final status and never runs again."
    )
    tombstone_max_kb: int = Field(
        8192, ge=64, description="Bytes of tombstones kept at most (about 150 bytes each); the oldest go first."
    )
    finished_params_max_bytes: int = Field(
        4096, ge=256, description="A finished job keeps a summary of its params no larger than this (inline images, "
        "long lists and long strings are replaced by what they were: `{\"omitted\": ...}`)."
    )
    default_timeout_s: Optional[float] = Field(None, gt=0, description="Timeout for jobs that name none.")
    progress_interval_s: float = Field(
        1.0, ge=0, description="Least time between two progress updates of one job on its status topic."
    )
    enable_debug_jobs: bool = Field(
        False, description="Accept the diagnostic job types `debug.sleep` (for testing timeouts, cancel, pools)."
    )


class StorageConfig(_Section):
    free_low_mb: float = Field(
        64, ge=0, description="Low-water mark of free space on the state disk: below it the node refuses new work "
        "with `disk_full` (control jobs still run), pauses running jobs at their next checkpoint and deletes the "
        "oldest outputs and result logs of finished jobs. Shown in the birth message and `node.stats`."
    )
    free_resume_mb: float = Field(
        128, ge=0, description="Free space at which the node takes work again and paused jobs go on."
    )
    reserve_mb: float = Field(
        16, ge=0, description="A file (`<state_dir>/reserve`) kept while there is room and deleted the moment a "
        "write fails for lack of space, so statuses and control jobs can still be written; taken again once the "
        "disk is `ok` and it leaves `free_low_mb` free. 0: none (a node whose disk is full to the last byte then "
        "answers nothing until space is freed; its birth still says `disk: full`)."
    )
    check_interval_s: float = Field(
        5.0, gt=0, le=3600, description="How often free space is checked; at least every second while the node is "
        "short of space, so that paused jobs go on soon after room is made. A write that fails for lack of space "
        "acts at once, whatever the interval."
    )
    results_max_mb: float = Field(
        1024, ge=0, description="Result logs of finished jobs kept at most; the oldest go first (their jobs stay, "
        "marked `results_pruned`, and `job.result` says so). Applied a few seconds after a job ends and at every "
        "prune (each minute)."
    )
    outputs_max_mb: float = Field(
        2048, ge=0, description="Outputs of finished jobs (annotated copies, masks, output files under "
        "`inference.outputs_dir`) kept at most; the oldest go first. Applied like `results_max_mb`."
    )
    outputs_days: float = Field(
        7.0, gt=0, description="Outputs of finished jobs older than this are deleted (their result logs stay with "
        "the job, see `jobs.retention_days`)."
    )
    spool_min_kb: int = Field(
        64, ge=1, description="Request params at least this large are kept in a file of their own "
        "(`<state_dir>/spool/`) until the job ends, not in the state journal and the agent's memory."
    )

    @model_validator(mode="after")
    def _hysteresis(self) -> "StorageConfig":
        if self.free_resume_mb < self.free_low_mb:
            raise ValueError("free_resume_mb must be at least free_low_mb")
        return self


class LoggingConfig(_Section):
    level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR.")
    journal: Optional[bool] = Field(
        None,
        description="Log to the systemd journal; default: when running under systemd and systemd-python is installed.",
    )

    @field_validator("level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.upper()
        if v not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return v


class DiscoveryConfig(_Section):
    enabled: bool = Field(True, description="Advertise this node over mDNS and browse for brokers and build peers.")
    interfaces: Optional[list[str]] = Field(
        None, description="Addresses or interface names to use for mDNS; default: all."
    )
    broker_preference: Optional[str] = Field(
        None, description="mDNS instance name of the preferred broker when several are advertised."
    )
    role: str = Field(
        "edge", description="Role advertised in TXT: `edge`, or `build` for a training peer that other nodes look for."
    )
    browse_timeout_s: float = Field(
        3.0, gt=0, le=60, description="How long to listen for brokers and peers before choosing (mDNS has no 'done')."
    )
    rebrowse_after_s: float = Field(
        60.0, ge=0, description="Browse for a broker again after the mDNS-found one has been unreachable this long."
    )

    @field_validator("role")
    @classmethod
    def _role(cls, v: str) -> str:
        if v not in {"edge", "build"}:
            raise ValueError("must be 'edge' or 'build'")
        return v


def default_node_id() -> str:
    """Stable identity: the machine id when there is one (survives hostname changes), else the hostname."""
    try:
        mid = Path("/etc/machine-id").read_text().strip()
        if re.fullmatch(r"[0-9a-f]{32}", mid):
            return f"cvw-{mid[:12]}"
    except OSError:
        pass
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).strip("-.") or "node"
    return host[:64]


def _default_state_dir() -> Path:
    # systemd's StateDirectory= exports STATE_DIRECTORY; an unprivileged user gets a per-user directory.
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/cv-worker")
    return Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "cv-worker"


class AgentConfig(BaseSettings):
    """The whole configuration of one node."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    node_id: str = Field(default_factory=default_node_id, description="This node's name in topics and mDNS.")
    state_dir: Path = Field(default_factory=_default_state_dir, description="Durable state (jobs, outbox).")
    pools: list[str] = Field(default_factory=list, description="Pools whose shared job topics this node serves.")
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    discovery: DiscoveryConfig = Field(default_factory=DiscoveryConfig)
    accelerators: AcceleratorsConfig = Field(default_factory=AcceleratorsConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    # Before `streams`: the `streams` validator reads the limit from the fields validated so far.
    stream_limits: StreamLimitsConfig = Field(default_factory=StreamLimitsConfig)
    streams: list[StreamConfig] = Field(
        default_factory=list, description="Streams watched from boot (`[[streams]]` tables, same fields as the "
        "params of `stream.start`; see docs/streams.md).")
    stats: StatsConfig = Field(default_factory=StatsConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)

    @field_validator("node_id")
    @classmethod
    def _node_id_token(cls, v: str) -> str:
        if not SAFE_TOKEN_RE.match(v):
            raise ValueError(
                "must be 1-128 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        return v

    @field_validator("pools")
    @classmethod
    def _pool_tokens(cls, v: list[str]) -> list[str]:
        for p in v:
            if not SAFE_TOKEN_RE.match(p):
                raise ValueError(f"pool name {p!r} must be letters, digits, '.', '_' or '-'")
        return v

    @field_validator("streams")
    @classmethod
    def _streams_within_limit(cls, v: list[StreamConfig], info: ValidationInfo) -> list[StreamConfig]:
        limits = info.data.get("stream_limits")  # absent when [stream_limits] itself is invalid (reported there)
        ids = list(dict.fromkeys(s.stream_id for s in v))
        if isinstance(limits, StreamLimitsConfig) and len(ids) > limits.max_streams:
            raise ValueError(f"declares {len(ids)} streams ({', '.join(ids)}) but stream_limits.max_streams is "
                             f"{limits.max_streams}: raise the limit or remove streams")
        return v

    # Set by load_config so that reloads and `config check` know where the values came from.
    _source: str = "defaults"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init kwargs; the environment wins over it, as an operator expects.
        return (env_settings, init_settings)

    @property
    def source(self) -> str:
        return self._source

    def masked(self) -> dict[str, Any]:
        """The effective configuration as plain data with secrets replaced, for printing."""
        data = self.model_dump(mode="json")
        if data["mqtt"].get("password") is not None:
            data["mqtt"]["password"] = "********"
        return data


def resolve_config_path(explicit: Optional[str | Path] = None) -> tuple[Path, bool]:
    """The config file to read and whether it was asked for by name (so that its absence is an error)."""
    if explicit:
        return Path(explicit), True
    if os.environ.get(ENV_CONFIG):
        return Path(os.environ[ENV_CONFIG]), True
    return DEFAULT_CONFIG_PATH, False


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def load_config(path: Optional[str | Path] = None) -> AgentConfig:
    """Load and validate the configuration; raises ConfigError naming every bad field."""
    cfg_path, required = resolve_config_path(path)
    data: dict[str, Any] = {}
    source = "defaults and environment"
    if cfg_path.exists():
        try:
            data = tomllib.loads(cfg_path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(str(cfg_path), [("(file)", f"not valid TOML: {e}")]) from None
        except OSError as e:
            raise ConfigError(str(cfg_path), [("(file)", f"cannot read: {e.strerror}")]) from None
        source = str(cfg_path)
    elif required:
        raise ConfigError(str(cfg_path), [("(file)", "no such file (given by --config or CV_WORKER_CONFIG)")])
    try:
        cfg = AgentConfig(**data)
    except ValidationError as e:
        raise ConfigError(source, [(_loc(err["loc"]), err["msg"]) for err in e.errors()]) from None
    cfg._source = source
    if cfg.mqtt.password_file is not None and not cfg.mqtt.password_file.is_file():
        raise ConfigError(source, [("mqtt.password_file", f"no such file: {cfg.mqtt.password_file}")])
    for name in ("tls_ca", "tls_cert", "tls_key"):
        p = getattr(cfg.mqtt, name)
        if p is not None and not p.is_file():
            raise ConfigError(source, [(f"mqtt.{name}", f"no such file: {p}")])
    if cfg.http.enabled:
        for name in ("token_file", "tls_cert", "tls_key"):
            p = getattr(cfg.http, name)
            if p is not None and not p.is_file():
                raise ConfigError(source, [(f"http.{name}", f"no such file: {p}")])
    return cfg
