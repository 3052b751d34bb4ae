"""mDNS / DNS-SD discovery: nodes advertise themselves, third parties browse for them, nodes find brokers and peers.

Three jobs, one module:

* :class:`Advertiser` registers ``<node_id>._cv-worker._tcp.local.`` with a TXT record describing the node, keeps
  that TXT current and withdraws it on shutdown. Registration probing takes ~1.7 s, so it runs on zeroconf's own
  event-loop thread and :meth:`Advertiser.start` returns at once.
* :func:`browse` / :class:`NodeBrowser` / :func:`find_nodes` are the public browse API (see docs/discovery.md).
* :func:`find_broker` and :func:`find_build_peers` let a freshly provisioned node find what it needs.

Everything read from the network is untrusted: parsing never raises, and nothing from TXT is used as an MQTT
subscription without validation (see agent/discovery_cli.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import ipaddress
import logging
import queue
import re
import secrets as _secrets
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Callable, Optional

import ifaddr
from pydantic import BaseModel, Field
from zeroconf import (
    DNSOutgoing,
    InterfaceChoice,
    IPVersion,
    RecordUpdate,
    RecordUpdateListener,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceInfo

from agent import __version__

if TYPE_CHECKING:  # pragma: no cover
    from agent.config import AgentConfig, DiscoveryConfig

log = logging.getLogger("cv_worker.discovery")

SERVICE_TYPE = "_cv-worker._tcp.local."
MQTT_TYPE = "_mqtt._tcp.local."
SECURE_MQTT_TYPE = "_secure-mqtt._tcp.local."
PROTO_VERSION = "1"
ROLES = ("edge", "build")

# RFC 6763 §6.1: one TXT string is length-prefixed by a single byte.
TXT_ENTRY_MAX = 255
# RFC 6763 §6.2: keep the whole TXT record under ~1300 bytes so the answer fits one Ethernet frame with the SRV
# and address records; bigger records fragment or get truncated by some resolvers.
TXT_TOTAL_MAX = 1300
# A DNS label is at most 63 bytes; keep room for the "-NN" suffix a name conflict adds.
INSTANCE_MAX = 56
_SRV = 33  # DNS record type SRV (zeroconf.const._TYPE_SRV, private there)
_FLAGS_RESPONSE = 0x8000 | 0x0400  # QR response + authoritative answer

# Keys this module writes; anything else must come through ``extra_txt`` and pass the key guard.
TXT_KEYS = (
    "node_id", "version", "role", "proto", "mqtt", "tls", "prefix", "accel", "models", "nmodels", "caps", "http",
)
_SECRET_KEY_RE = re.compile(r"pass|secret|token|key|cred|auth|cookie|session|private|cert", re.IGNORECASE)
# Values that look like bearer tokens or JWTs never belong in a broadcast record.
_SECRET_VALUE_RE = re.compile(r"(?i)\bbearer\s|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}|-----BEGIN ")
_ENDPOINT_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]{0,252}):([0-9]{1,5})$")


class DiscoveryError(Exception):
    """A discovery setting cannot be used (unknown interface name, bad endpoint)."""


class SecretInTxtError(ValueError):
    """Refused to put something that looks like a secret into a broadcast TXT record."""


# --------------------------------------------------------------------------------------------------------------------
# Data models
# --------------------------------------------------------------------------------------------------------------------


class NodeInfo(BaseModel):
    """One cv-worker node as seen on the network, parsed from its DNS-SD records."""

    name: str = Field(description="mDNS instance name: the node id, or `<id>-2` after a name conflict.")
    node_id: str = Field(description="The node's own id (TXT `node_id`); authoritative over `name`.")
    addresses: list[str] = Field(default_factory=list, description="IPv4 first, then IPv6 (scoped when link-local).")
    host: Optional[str] = Field(None, description="SRV target host name.")
    port: int = Field(0, description="SRV port: the HTTP port when the node opens one, else 0.")
    version: str = ""
    role: str = "edge"
    proto: str = ""
    mqtt: Optional[str] = Field(None, description="Broker `host:port` the node uses.")
    tls: bool = Field(False, description="The node talks TLS to its broker.")
    prefix: str = ""
    accel: list[str] = Field(default_factory=list)
    models: list[str] = Field(default_factory=list, description="Installed models; may be a prefix of the list.")
    models_total: int = Field(0, description="How many models the node has; > len(models) when TXT was truncated.")
    caps: list[str] = Field(default_factory=list)
    http_port: Optional[int] = None
    txt: dict[str, str] = Field(default_factory=dict, description="All TXT entries, raw.")

    @property
    def models_truncated(self) -> bool:
        return self.models_total > len(self.models)

    def mqtt_endpoint(self) -> Optional[tuple[str, int]]:
        """The advertised broker as ``(host, port)``, or None when absent or malformed."""
        return parse_endpoint(self.mqtt) if self.mqtt else None

    @classmethod
    def from_service_info(cls, info: ServiceInfo) -> "NodeInfo":
        txt = {k: (v or "") for k, v in info.decoded_properties.items()}
        instance = instance_of(info.name, info.type)
        models = _split(txt.get("models", ""))
        return cls(
            name=instance,
            node_id=txt.get("node_id") or instance,
            addresses=_sorted_addresses(info.parsed_scoped_addresses()),
            host=info.server.rstrip(".") if info.server else None,
            port=info.port or 0,
            version=txt.get("version", ""),
            role=txt.get("role", "edge") or "edge",
            proto=txt.get("proto", ""),
            mqtt=txt.get("mqtt") or None,
            tls=txt.get("tls") == "1",
            prefix=txt.get("prefix", ""),
            accel=_split(txt.get("accel", "")),
            models=models,
            models_total=max(_int(txt.get("nmodels"), len(models)), len(models)),
            caps=_split(txt.get("caps", "")),
            http_port=_port_or_none(txt.get("http")),
            txt=txt,
        )


class NodeEvent(BaseModel):
    """A change seen by a browser. ``node`` is the last known state (also for ``removed``)."""

    kind: str = Field(description="added, updated or removed")
    name: str
    node: Optional[NodeInfo] = None
    at: float = Field(default_factory=time.time)


class NameConflict(BaseModel):
    """Another responder claimed this node's instance name."""

    requested: str = Field(description="The name this node asked for (its node id).")
    previous: str = Field(description="The name in use when the conflict was seen.")
    final: str = Field(description="The name this node advertises now.")
    other_host: Optional[str] = Field(None, description="SRV target of the other node, when known.")
    renamed: bool = Field(description="False when this node kept its name and the other one had to yield.")


class BrokerInfo(BaseModel):
    """An MQTT broker advertised under ``_mqtt._tcp`` or ``_secure-mqtt._tcp``."""

    name: str = Field(description="mDNS instance name (what `discovery.broker_preference` matches).")
    service_type: str
    host: str = Field(description="Address to connect to (first IPv4 address, else the mDNS host name).")
    port: int
    tls: bool
    server: Optional[str] = Field(None, description="mDNS host name: the name a TLS certificate is checked against.")
    addresses: list[str] = Field(default_factory=list)
    priority: int = Field(0, description="TXT `priority` when present, else the SRV priority; lower wins.")
    order: int = Field(0, description="Order first seen, 0-based; the last tie-breaker.")
    txt: dict[str, str] = Field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------------


def _split(value: str) -> list[str]:
    return [p for p in (s.strip() for s in value.split(",")) if p]


def _int(value: Optional[str], default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def _port_or_none(value: Optional[str]) -> Optional[int]:
    port = _int(value, 0)
    return port if 0 < port < 65536 else None


def _sorted_addresses(addresses: Sequence[str]) -> list[str]:
    # IPv4 first: it is what most clients (and paho) reach most reliably on a LAN.
    def key(a: str) -> tuple[int, str]:
        return (0 if ":" not in a else 1, a)

    return sorted(dict.fromkeys(addresses), key=key)


def instance_of(name: str, type_: str) -> str:
    """``node-1._cv-worker._tcp.local.`` -> ``node-1``."""
    suffix = "." + type_
    return name[: -len(suffix)] if name.lower().endswith(suffix.lower()) else name


def parse_endpoint(value: str) -> Optional[tuple[str, int]]:
    """``host:port`` or ``[v6]:port`` -> ``(host, port)``; None when malformed."""
    m = _ENDPOINT_RE.match(value.strip())
    if not m:
        return None
    port = int(m.group(2))
    if not 0 < port < 65536:
        return None
    return m.group(1).strip("[]"), port


def format_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def instance_label(node_id: str) -> str:
    """The mDNS instance name for a node id.

    Dots are legal in a DNS-SD instance name but zeroconf does not escape them on the wire, so other browsers
    would see extra labels; they become '-'. The TXT ``node_id`` keeps the exact id.
    """
    label = re.sub(r"[\x00-\x1f\x7f.]", "-", node_id)
    return _truncate_utf8(label, INSTANCE_MAX) or "node"


def _truncate_utf8(value: str, limit: int) -> str:
    return value.encode()[:limit].decode(errors="ignore")


def _clean_item(item: str) -> str:
    # Commas separate list items and control characters confuse every TXT viewer.
    return re.sub(r"[\x00-\x1f\x7f,]", "_", str(item)).strip()


# --------------------------------------------------------------------------------------------------------------------
# Interfaces and addresses
# --------------------------------------------------------------------------------------------------------------------


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value.split("%")[0])
        return True
    except ValueError:
        return False


def _adapter_ips(adapter: Any) -> list[str]:
    out = []
    for ip in adapter.ips:
        out.append(ip.ip if isinstance(ip.ip, str) else ip.ip[0])
    return out


def resolve_interfaces(interfaces: Optional[Sequence[str]]) -> Any:
    """Config ``discovery.interfaces`` (addresses or interface names) -> what ``Zeroconf(interfaces=...)`` takes."""
    if not interfaces:
        return InterfaceChoice.All
    adapters = {a.nice_name: a for a in ifaddr.get_adapters()}
    out: list[Any] = []
    for entry in interfaces:
        if _is_ip(entry):
            out.append(entry)
            continue
        adapter = adapters.get(entry)
        if adapter is None:
            raise DiscoveryError(f"unknown network interface {entry!r} (known: {', '.join(sorted(adapters))})")
        v4 = [ip for ip in _adapter_ips(adapter) if ":" not in ip]
        # zeroconf joins IPv6 multicast by interface index, IPv4 by address.
        out.extend(v4 if v4 else [adapter.index])
    return list(dict.fromkeys(out))


def local_addresses(interfaces: Optional[Sequence[str]] = None) -> list[str]:
    """Addresses worth advertising: those of the chosen interfaces, or all but loopback and IPv6 link-local."""
    adapters = ifaddr.get_adapters()
    chosen: list[str] = []
    if interfaces:
        by_name = {a.nice_name: a for a in adapters}
        for entry in interfaces:
            if _is_ip(entry):
                chosen.append(entry)
            elif entry in by_name:
                chosen.extend(_adapter_ips(by_name[entry]))
    else:
        for a in adapters:
            chosen.extend(_adapter_ips(a))
    out = []
    for a in chosen:
        try:
            ip = ipaddress.ip_address(a.split("%")[0])
        except ValueError:
            continue
        # A link-local IPv6 address is useless to a peer without its scope; loopback only helps this host.
        if ip.version == 6 and ip.is_link_local:
            continue
        if ip.is_loopback and not interfaces:
            continue
        out.append(str(ip))
    return _sorted_addresses(out) or ["127.0.0.1"]


def new_zeroconf(interfaces: Optional[Sequence[str]] = None) -> Zeroconf:
    """A Zeroconf instance on the chosen interfaces that always runs its own event-loop thread.

    Without that, zeroconf attaches to an asyncio loop running in the calling thread, and its blocking calls
    (unregister on stop) would then deadlock an asyncio-based daemon.
    """
    choice = resolve_interfaces(interfaces)
    kwargs: dict[str, Any] = {"interfaces": choice}
    if choice == InterfaceChoice.All:
        kwargs["ip_version"] = IPVersion.V4Only
    if "use_asyncio" in inspect.signature(Zeroconf.__init__).parameters:
        return Zeroconf(use_asyncio=False, **kwargs)
    # Older zeroconf: build it on a thread with no running loop so it starts its own.
    box: dict[str, Any] = {}

    def build() -> None:
        try:
            box["zc"] = Zeroconf(**kwargs)
        except BaseException as e:  # re-raised in the caller's thread
            box["err"] = e

    t = threading.Thread(target=build, name="zeroconf-init", daemon=True)
    t.start()
    t.join()
    if "err" in box:
        raise box["err"]
    return box["zc"]


# --------------------------------------------------------------------------------------------------------------------
# TXT encoding with the secret guard
# --------------------------------------------------------------------------------------------------------------------


def _fit_list(key: str, items: Sequence[str], budget: int) -> tuple[str, int]:
    """Join whole items while ``key=value`` fits both 255 bytes and ``budget``; never cut a name in half."""
    room = min(TXT_ENTRY_MAX, budget) - len(key.encode()) - 1
    parts: list[str] = []
    used = 0
    for item in items:
        size = len(item.encode()) + (1 if parts else 0)
        if used + size > room:
            break
        parts.append(item)
        used += size
    return ",".join(parts), len(parts)


def build_txt(
    *,
    node_id: str,
    version: str = __version__,
    role: str = "edge",
    mqtt: Optional[str] = None,
    tls: bool = False,
    prefix: str = "cvw/v1",
    accel: Sequence[str] = (),
    models: Sequence[str] = (),
    caps: Sequence[str] = (),
    http_port: Optional[int] = None,
    extra: Optional[Mapping[str, str]] = None,
    secrets: Sequence[str] = (),
) -> dict[str, str]:
    """The TXT record for a node, within DNS-SD size limits, refusing anything that looks secret.

    ``secrets`` are values that must never appear in TXT (the MQTT password): any TXT value containing one is an
    error, as is an ``extra`` key named like a credential or a ``mqtt`` value carrying ``user:pass@``.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    if mqtt is not None:
        if "@" in mqtt or "://" in mqtt:
            raise SecretInTxtError("the mqtt TXT entry must be a plain host:port (no scheme, no user:password@)")
        if parse_endpoint(mqtt) is None:
            raise ValueError(f"mqtt must be host:port, not {mqtt!r}")
    if http_port is not None and not 0 < http_port < 65536:
        raise ValueError(f"http_port out of range: {http_port}")

    scalars: dict[str, str] = {
        "node_id": node_id,
        "version": _truncate_utf8(_clean_item(version), 64),
        "role": role,
        "proto": PROTO_VERSION,
    }
    if mqtt:
        scalars["mqtt"] = mqtt
    if tls:
        scalars["tls"] = "1"
    scalars["prefix"] = prefix
    if http_port:
        scalars["http"] = str(http_port)
    for key, value in (extra or {}).items():
        if key in TXT_KEYS or key in scalars:
            raise ValueError(f"extra TXT key {key!r} collides with a built-in key")
        if _SECRET_KEY_RE.search(key):
            raise SecretInTxtError(f"refusing TXT key {key!r}: it is named like a credential")
        if not re.fullmatch(r"[!-<>-~]{1,9}", key):
            raise ValueError(f"TXT key {key!r} must be 1-9 printable ASCII characters without '='")
        scalars[key] = str(value)
    for key, value in scalars.items():
        if len(key.encode()) + 1 + len(value.encode()) > TXT_ENTRY_MAX:
            raise ValueError(f"TXT entry {key!r} is longer than {TXT_ENTRY_MAX} bytes")

    txt = dict(scalars)
    budget = TXT_TOTAL_MAX - sum(len(k.encode()) + len(v.encode()) + 2 for k, v in txt.items())
    clean_models = [m for m in dict.fromkeys(_clean_item(m) for m in models) if m]
    # accel and caps are short and matter most to a scheduler; models get what is left.
    for key, items in (("accel", accel), ("caps", caps), ("models", clean_models)):
        cleaned = [i for i in dict.fromkeys(_clean_item(i) for i in items) if i]
        if key == "models":
            # Reserve room for the total count so a reader can tell the list was cut.
            nmodels = str(len(cleaned))
            budget -= len("nmodels=") + len(nmodels) + 1
        value, _ = _fit_list(key, cleaned, budget - 1)
        txt[key] = value
        budget -= len(key) + len(value.encode()) + 2
        if key == "models":
            txt["nmodels"] = nmodels
    check_no_secrets(txt, secrets)
    return txt


def check_no_secrets(txt: Mapping[str, str], secrets: Sequence[str] = ()) -> None:
    """Raise SecretInTxtError when a TXT record carries a known secret or something shaped like a token."""
    for key, value in txt.items():
        if key not in TXT_KEYS and _SECRET_KEY_RE.search(key):
            raise SecretInTxtError(f"refusing TXT key {key!r}: it is named like a credential")
        if _SECRET_VALUE_RE.search(value):
            raise SecretInTxtError(f"refusing TXT entry {key!r}: its value looks like a token or key")
        for secret in secrets:
            # Very short secrets would match innocent values; they are rejected at config time anyway.
            if secret and len(secret) >= 4 and secret in value:
                raise SecretInTxtError(f"refusing TXT entry {key!r}: it contains a configured secret")


# --------------------------------------------------------------------------------------------------------------------
# Advertiser
# --------------------------------------------------------------------------------------------------------------------


class _SrvWatch(RecordUpdateListener):
    """Sees every SRV record the Advertiser's Zeroconf receives, to catch a second responder for our name."""

    def __init__(self, advertiser: "Advertiser"):
        self._advertiser = advertiser

    def async_update_records(self, zc: Zeroconf, now: float, records: list[RecordUpdate]) -> None:
        for update in records:
            rec = update.new
            if rec.type == _SRV:
                self._advertiser._async_on_srv(rec.name, getattr(rec, "server", ""), rec.ttl == 0)

    def async_update_records_complete(self) -> None:
        pass


class Advertiser:
    """Advertise this node as ``<node_id>._cv-worker._tcp.local.`` and keep the advertisement current.

    Thread-safe; :meth:`start` and :meth:`update` return at once (the work runs on zeroconf's loop thread), and
    :meth:`stop` blocks for the goodbye packets (about 0.4 s). Do not call these from a callback.

    Name conflicts: zeroconf's probing renames to ``<id>-2`` when another responder already owns the name. Two
    nodes that both got the name anyway (booted together, or probes missed each other) see each other's SRV
    records; the one whose host name sorts lower yields and takes the next free ``<id>-N``, the other keeps the
    name. Either way it is logged as a warning, appended to :attr:`conflicts` and passed to ``on_conflict``.
    """

    def __init__(
        self,
        node_id: str,
        *,
        version: str = __version__,
        role: str = "edge",
        mqtt: Optional[str] = None,
        tls: bool = False,
        prefix: str = "cvw/v1",
        accel: Sequence[str] = (),
        models: Sequence[str] = (),
        caps: Sequence[str] = (),
        http_port: Optional[int] = None,
        extra_txt: Optional[Mapping[str, str]] = None,
        secrets: Sequence[str] = (),
        interfaces: Optional[Sequence[str]] = None,
        addresses: Optional[Sequence[str]] = None,
        enabled: bool = True,
        on_conflict: Optional[Callable[[NameConflict], None]] = None,
        service_type: str = SERVICE_TYPE,
        zeroconf: Optional[Zeroconf] = None,
    ):
        self.node_id = node_id
        self.enabled = enabled
        self.interfaces = list(interfaces) if interfaces else None
        self.service_type = service_type
        self.on_conflict = on_conflict
        self.conflicts: list[NameConflict] = []
        self.error: Optional[str] = None
        self._fields: dict[str, Any] = dict(
            node_id=node_id, version=version, role=role, mqtt=mqtt, tls=tls, prefix=prefix, accel=list(accel),
            models=list(models), caps=list(caps), http_port=http_port, extra=dict(extra_txt or {}),
        )
        self._secrets = [s for s in secrets if s]
        self._fixed_addresses = list(addresses) if addresses else None
        # Validate now: a secret in TXT is a programming error the caller should see, not a log line later.
        self._txt = build_txt(**self._fields, secrets=self._secrets)
        self._requested = instance_label(node_id)
        # A host name of our own: sharing the machine's name with avahi would make the two fight over its
        # address records, and a per-instance suffix tells two same-id nodes apart in the conflict check.
        host_label = re.sub(r"[^A-Za-z0-9-]", "-", self._requested)[:48].strip("-") or "node"
        self._server = f"{host_label}-{_secrets.token_hex(3)}.local."
        self._given_zc = zeroconf
        self._zc: Optional[Zeroconf] = None
        self._watch: Optional[_SrvWatch] = None
        self._lock = threading.Lock()
        self._state = "disabled" if not enabled else "idle"
        self._name = self._requested
        self._info: Optional[ServiceInfo] = None
        self._registered = threading.Event()
        # Loop-thread state: the one registration task at a time, and a TXT change waiting for it.
        self._task: Optional[asyncio.Future[Any]] = None
        self._dirty = False
        self._reannounce: Optional[asyncio.TimerHandle] = None
        self._known_rivals: set[str] = set()

    @classmethod
    def from_config(
        cls,
        cfg: "AgentConfig",
        *,
        mqtt_endpoint: Optional[str] = None,
        accel: Sequence[str] = (),
        models: Sequence[str] = (),
        caps: Sequence[str] = (),
        http_port: Optional[int] = None,
        on_conflict: Optional[Callable[[NameConflict], None]] = None,
    ) -> "Advertiser":
        """An Advertiser for this node's config. ``mqtt_endpoint`` overrides the configured broker (pass the one
        found by :func:`find_broker` when the config names none)."""
        if mqtt_endpoint is None and cfg.mqtt.host:
            mqtt_endpoint = format_endpoint(cfg.mqtt.host, cfg.mqtt.effective_port)
        secrets: list[str] = []
        try:
            password = cfg.mqtt.read_password()
        except OSError:
            password = None
        if password:
            secrets.append(password)
        return cls(
            cfg.node_id,
            role=cfg.discovery.role,
            mqtt=mqtt_endpoint,
            tls=cfg.mqtt.tls,
            prefix=cfg.mqtt.topic_prefix,
            accel=accel,
            models=models,
            caps=caps,
            http_port=http_port,
            secrets=secrets,
            interfaces=cfg.discovery.interfaces,
            enabled=cfg.discovery.enabled,
            on_conflict=on_conflict,
        )

    # ---- public state -------------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """Instance name currently advertised (the node id unless a conflict forced ``<id>-N``)."""
        with self._lock:
            return self._name

    @property
    def state(self) -> str:
        """disabled, idle, probing, registered, failed or stopped."""
        with self._lock:
            return self._state

    @property
    def txt(self) -> dict[str, str]:
        with self._lock:
            return dict(self._txt)

    @property
    def server(self) -> str:
        return self._server

    def wait_registered(self, timeout: Optional[float] = None) -> bool:
        """Block until the first registration finished (or failed); True when registered."""
        self._registered.wait(timeout)
        return self.state == "registered"

    # ---- lifecycle -----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Begin advertising; returns at once. Failures (no multicast interface...) are logged, never raised."""
        if not self.enabled:
            log.info("mDNS advertising is disabled in the config (discovery.enabled = false)")
            self._registered.set()
            return
        with self._lock:
            if self._zc is not None or self._state == "stopped":
                return
            try:
                self._zc = self._given_zc or new_zeroconf(self.interfaces)
            except (OSError, DiscoveryError) as e:
                self._state = "failed"
                self.error = f"cannot open mDNS sockets: {e}"
                log.error("mDNS advertising off: %s", self.error)
                self._registered.set()
                return
            self._state = "probing"
            zc = self._zc
        self._watch = _SrvWatch(self)
        zc.add_listener(self._watch, None)
        assert zc.loop is not None
        asyncio.run_coroutine_threadsafe(self._async_register(self._requested, first=True), zc.loop)

    def update(
        self,
        *,
        accel: Optional[Sequence[str]] = None,
        models: Optional[Sequence[str]] = None,
        caps: Optional[Sequence[str]] = None,
        mqtt: Optional[str] = None,
        tls: Optional[bool] = None,
        version: Optional[str] = None,
        http_port: Optional[int] = None,
    ) -> Optional[concurrent.futures.Future[None]]:
        """Change TXT in place (same instance name); returns at once.

        Call it when accelerators or models change, or the broker changes. Only the given fields change. The
        returned future completes when the new TXT has been announced (None when not started or disabled).
        Raises SecretInTxtError / ValueError for a bad value, like the constructor.
        """
        changes = {
            k: (list(v) if isinstance(v, (list, tuple)) else v)
            for k, v in dict(
                accel=accel, models=models, caps=caps, mqtt=mqtt, tls=tls, version=version, http_port=http_port
            ).items()
            if v is not None
        }
        with self._lock:
            fields = {**self._fields, **changes}
            txt = build_txt(**fields, secrets=self._secrets)
            self._fields = fields
            self._txt = txt
            zc = self._zc
            if zc is None or self._state in ("stopped", "failed"):
                return None
        assert zc.loop is not None
        return asyncio.run_coroutine_threadsafe(self._async_push_update(), zc.loop)

    def stop(self, timeout: float = 3.0) -> None:
        """Withdraw the advertisement (goodbye packets, so browsers see a removal) and close the sockets."""
        with self._lock:
            zc, self._zc = self._zc, None
            self._state = "stopped"
        self._registered.set()
        if zc is None:
            return
        assert zc.loop is not None
        try:
            asyncio.run_coroutine_threadsafe(self._async_stop(zc), zc.loop).result(timeout)
        except Exception as e:  # stopping must not take the daemon's shutdown down with it
            log.warning("mDNS unregistration incomplete: %s", e)
        if self._watch is not None:
            zc.remove_listener(self._watch)
        if self._given_zc is None:
            zc.close()

    def __enter__(self) -> "Advertiser":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- loop-thread internals ----------------------------------------------------------------------------------

    def _addresses(self) -> list[str]:
        return self._fixed_addresses or local_addresses(self.interfaces)

    def _make_info(self, instance: str) -> ServiceInfo:
        with self._lock:
            txt = dict(self._txt)
            port = self._fields.get("http_port") or 0
        return ServiceInfo(
            self.service_type,
            f"{instance}.{self.service_type}",
            port=port,
            properties=txt,
            server=self._server,
            parsed_addresses=self._addresses(),
        )

    async def _async_register(self, instance: str, first: bool, rival: Optional[str] = None) -> None:
        zc = self._zc or self._given_zc
        if zc is None:
            return
        self._task = asyncio.current_task()
        info = self._make_info(instance)
        try:
            broadcast = await zc.async_register_service(info, allow_name_change=True)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            with self._lock:
                self._state = "failed"
                self.error = f"mDNS registration failed: {e!r}"
            log.error("%s", self.error)
            self._registered.set()
            return
        final = instance_of(info.name, self.service_type)
        with self._lock:
            previous = self._name
            self._info = info
            self._name = final
            self._state = "registered"
        self._registered.set()
        if final != instance:
            # zeroconf's probing found the name taken and picked "<name>-N".
            other = rival or self._rival_server(f"{instance}.{self.service_type}")
            self._report(NameConflict(requested=self._requested, previous=instance, final=final,
                                      other_host=other, renamed=True))
        elif not first:
            self._report(NameConflict(requested=self._requested, previous=previous, final=final,
                                      other_host=rival, renamed=True))
        log.info("mDNS: advertising %s as %r on %s", self.service_type, final, ", ".join(info.parsed_addresses()))
        await broadcast
        if self._dirty:
            await self._async_push_update(from_registration=True)

    def _rival_server(self, full_name: str) -> Optional[str]:
        zc = self._zc
        if zc is None:
            return None
        for rec in zc.cache.async_all_by_details(full_name.lower(), _SRV, 1):
            server = getattr(rec, "server", "")
            if server and server.lower() != self._server.lower():
                return server.rstrip(".")
        return None

    async def _async_push_update(self, from_registration: bool = False) -> None:
        zc = self._zc
        if zc is None:
            return
        busy = self._task is not None and not self._task.done() and not from_registration
        if self._state != "registered" or busy:
            self._dirty = True  # the running registration applies it when done
            return
        self._dirty = False
        # Addresses may have changed since registration (DHCP renew, new interface): refresh them too.
        if self._fixed_addresses is None and self.interfaces is None and hasattr(zc, "async_update_interfaces"):
            try:
                await zc.async_update_interfaces()
            except Exception as e:  # a flaky interface must not stop the TXT update
                log.debug("mDNS interface rescan failed: %s", e)
        info = self._make_info(self._name)
        broadcast = await zc.async_update_service(info)
        with self._lock:
            self._info = info
        await broadcast

    async def _async_stop(self, zc: Zeroconf) -> None:
        if self._reannounce is not None:
            self._reannounce.cancel()
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        info = self._info
        if info is not None and zc.registry.async_get_info_name(info.key) is not None:
            await (await zc.async_unregister_service(info))

    def _async_on_srv(self, name: str, server: str, goodbye: bool) -> None:
        info = self._info
        if info is None or self._state != "registered" or name.lower() != info.key:
            return
        if not server or server.lower() == self._server.lower():
            return  # our own announcement coming back over multicast loopback
        if self._task is not None and not self._task.done():
            return  # already re-registering
        rival = server.rstrip(".")
        if goodbye:
            # The other node yielded (see below). Its goodbye may have expired a TXT identical to ours in other
            # caches, so say ours again.
            self._note_rival_kept(rival)
            return
        if self._server.lower() < server.lower():
            # We lose the tie-break: withdraw our SRV and TXT with a goodbye and take the next free name. Not the
            # PTR: it is identical to the winner's, and its goodbye would make every browser drop the winner.
            zc = self._zc
            if zc is None:
                return
            zc.registry.async_remove(info)
            out = DNSOutgoing(_FLAGS_RESPONSE)
            out.add_answer_at_time(info.dns_service(override_ttl=0), 0)
            out.add_answer_at_time(info.dns_text(override_ttl=0), 0)
            zc.async_send(out)
            with self._lock:
                self._state = "probing"
            asyncio.ensure_future(self._async_register(self._next_free_name(zc), first=False, rival=rival))
        else:
            self._note_rival_kept(rival)

    def _note_rival_kept(self, rival: str) -> None:
        if rival not in self._known_rivals:
            self._known_rivals.add(rival)
            self._report(NameConflict(requested=self._requested, previous=self._name, final=self._name,
                                      other_host=rival, renamed=False))
        # The other node's records flushed ours from caches with the cache-flush bit; say ours again once it has
        # gone quiet.
        if self._reannounce is not None:
            self._reannounce.cancel()
        loop = asyncio.get_running_loop()
        self._reannounce = loop.call_later(1.5, lambda: asyncio.ensure_future(self._async_reannounce()))

    async def _async_reannounce(self) -> None:
        zc, info = self._zc, self._info
        if zc is None or info is None or self._state != "registered":
            return
        await (await zc.async_update_service(info))

    def _next_free_name(self, zc: Zeroconf) -> str:
        for n in range(2, 1000):
            candidate = f"{self._requested}-{n}"
            if candidate == self._name:
                continue
            if not zc.cache.current_entry_with_name_and_alias(self.service_type, f"{candidate}.{self.service_type}"):
                return candidate
        return f"{self._requested}-{_secrets.token_hex(2)}"

    def _report(self, conflict: NameConflict) -> None:
        self.conflicts.append(conflict)
        if conflict.renamed:
            log.warning(
                "mDNS name %r is already used by another node (host %s); this node now advertises as %r. "
                "Two nodes share node_id %r: give each a unique node_id.",
                conflict.previous, conflict.other_host or "unknown", conflict.final, self.node_id,
            )
        else:
            log.warning(
                "another node (host %s) also claims mDNS name %r; this node keeps it and the other must rename. "
                "Two nodes share node_id %r: give each a unique node_id.",
                conflict.other_host, conflict.final, self.node_id,
            )
        if self.on_conflict is not None:
            try:
                self.on_conflict(conflict)
            except Exception:
                log.exception("on_conflict callback failed")


# --------------------------------------------------------------------------------------------------------------------
# Browsing
# --------------------------------------------------------------------------------------------------------------------


class _ServiceTracker:
    """Follows services of some types, resolves them and calls ``on_change(kind, type, name, info)``.

    Callbacks run on zeroconf's loop thread. Resolution is asynchronous, and a removal that overtakes a pending
    resolution wins (generation counter), so a consumer never sees ``added`` after ``removed`` for one incarnation.
    """

    SETTLE_S = 2.5

    def __init__(
        self,
        zc: Zeroconf,
        types: Sequence[str],
        on_change: Callable[[str, str, str, Optional[ServiceInfo]], None],
        resolve_timeout: float = 3.0,
    ):
        self._zc = zc
        self._types = list(types)
        self._on_change = on_change
        self._resolve_ms = int(resolve_timeout * 1000)
        self._generation: dict[str, int] = {}
        self._tasks: set[asyncio.Future[Any]] = set()
        self._settling: set[str] = set()
        self._browser: Optional[ServiceBrowser] = None

    def start(self) -> None:
        self._browser = ServiceBrowser(self._zc, self._types, handlers=[self._handler])

    def cancel(self) -> None:
        if self._browser is not None:
            self._browser.cancel()
            self._browser = None
        loop = self._zc.loop
        if loop is not None and loop.is_running():
            for task in list(self._tasks):
                loop.call_soon_threadsafe(task.cancel)

    def _handler(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        # ServiceBrowser calls this on its own thread; hop to the loop so removals and resolutions stay ordered.
        assert self._zc.loop is not None
        self._zc.loop.call_soon_threadsafe(self._async_handle, service_type, name, state_change)

    def _async_handle(self, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        key = name.lower()
        gen = self._generation.get(key, 0)
        if state_change is ServiceStateChange.Removed:
            self._generation[key] = gen + 1
            self._on_change("removed", service_type, name, None)
            return
        self._spawn(self._resolve(service_type, name, key, gen))
        # Re-read once things have settled: when two responders fight over a name (a conflict being resolved),
        # the winner's re-announcement refreshes records already cached, which fires no event of its own.
        if key not in self._settling:
            self._settling.add(key)
            self._spawn(self._settle(service_type, name, key))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle(self, service_type: str, name: str, key: str) -> None:
        try:
            await asyncio.sleep(self.SETTLE_S)
        finally:
            self._settling.discard(key)
        await self._resolve(service_type, name, key, self._generation.get(key, 0))

    async def _resolve(self, service_type: str, name: str, key: str, gen: int) -> None:
        info = AsyncServiceInfo(service_type, name)
        try:
            ok = await info.async_request(self._zc, self._resolve_ms)
        except Exception as e:  # a malformed answer from one device must not stop the browser
            log.debug("cannot resolve %s: %s", name, e)
            return
        if not ok or self._generation.get(key, 0) != gen:
            return
        self._on_change("resolved", service_type, name, info)


class NodeBrowser:
    """Follow cv-worker nodes on the network; ``on_event(NodeEvent)`` is called for each change.

    The callback runs on zeroconf's loop thread: keep it short (``queue.put`` is ideal). :attr:`nodes` is a
    thread-safe snapshot of the nodes currently present. Use as a context manager or call start()/stop().
    """

    def __init__(
        self,
        on_event: Optional[Callable[[NodeEvent], None]] = None,
        *,
        interfaces: Optional[Sequence[str]] = None,
        service_type: str = SERVICE_TYPE,
        zeroconf: Optional[Zeroconf] = None,
    ):
        self.on_event = on_event
        self.interfaces = list(interfaces) if interfaces else None
        self.service_type = service_type
        self._given_zc = zeroconf
        self._zc: Optional[Zeroconf] = None
        self._tracker: Optional[_ServiceTracker] = None
        self._lock = threading.Lock()
        self._nodes: dict[str, NodeInfo] = {}

    @property
    def nodes(self) -> dict[str, NodeInfo]:
        """Instance name -> NodeInfo of every node present now."""
        with self._lock:
            return dict(self._nodes)

    def start(self) -> "NodeBrowser":
        self._zc = self._given_zc or new_zeroconf(self.interfaces)
        self._tracker = _ServiceTracker(self._zc, [self.service_type], self._on_change)
        self._tracker.start()
        return self

    def stop(self) -> None:
        if self._tracker is not None:
            self._tracker.cancel()
            self._tracker = None
        if self._zc is not None and self._given_zc is None:
            self._zc.close()
        self._zc = None

    def __enter__(self) -> "NodeBrowser":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on_change(self, kind: str, service_type: str, name: str, info: Optional[ServiceInfo]) -> None:
        instance = instance_of(name, service_type)
        if kind == "removed":
            with self._lock:
                node = self._nodes.pop(instance, None)
            if node is None:
                return
            event = NodeEvent(kind="removed", name=instance, node=node)
        else:
            assert info is not None
            try:
                node = NodeInfo.from_service_info(info)
            except Exception as e:  # garbage from the network
                log.debug("ignoring unparseable node %s: %s", name, e)
                return
            with self._lock:
                old = self._nodes.get(instance)
                if old == node:
                    return  # a record refresh that changed nothing a consumer can see
                self._nodes[instance] = node
            event = NodeEvent(kind="added" if old is None else "updated", name=instance, node=node)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                log.exception("NodeBrowser on_event callback failed")


def browse(
    timeout: Optional[float] = None,
    *,
    interfaces: Optional[Sequence[str]] = None,
    service_type: str = SERVICE_TYPE,
) -> Iterator[NodeEvent]:
    """Yield :class:`NodeEvent` s (added / updated / removed) as nodes come and go.

    ``timeout`` bounds the whole browse in seconds (None: until the consumer stops iterating). Breaking out of the
    loop or closing the generator stops the browser and closes its sockets.
    """
    events: queue.Queue[NodeEvent] = queue.Queue()
    deadline = None if timeout is None else time.monotonic() + timeout
    with NodeBrowser(events.put, interfaces=interfaces, service_type=service_type):
        while True:
            wait = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if wait <= 0:
                return
            try:
                yield events.get(timeout=wait)
            except queue.Empty:
                continue


def find_nodes(
    timeout: float = 3.0,
    *,
    interfaces: Optional[Sequence[str]] = None,
    role: Optional[str] = None,
    service_type: str = SERVICE_TYPE,
) -> list[NodeInfo]:
    """Listen for ``timeout`` seconds and return the nodes present then, sorted by name."""
    with NodeBrowser(interfaces=interfaces, service_type=service_type) as browser:
        time.sleep(timeout)
        nodes = browser.nodes
    found = [n for n in nodes.values() if role is None or n.role == role]
    return sorted(found, key=lambda n: n.name)


def find_build_peers(
    timeout: float = 3.0,
    *,
    interfaces: Optional[Sequence[str]] = None,
    exclude_node_id: Optional[str] = None,
) -> list[NodeInfo]:
    """Nodes advertising ``role=build`` (training peers), excluding ourselves."""
    return [
        n for n in find_nodes(timeout, interfaces=interfaces, role="build")
        if exclude_node_id is None or n.node_id != exclude_node_id
    ]


# --------------------------------------------------------------------------------------------------------------------
# Brokers
# --------------------------------------------------------------------------------------------------------------------


def _broker_from_info(info: ServiceInfo, order: int) -> Optional[BrokerInfo]:
    if not info.port:
        return None
    txt = {k: (v or "") for k, v in info.decoded_properties.items()}
    addresses = _sorted_addresses(info.parsed_scoped_addresses())
    server = info.server.rstrip(".") if info.server else None
    host = addresses[0] if addresses else server
    if not host:
        return None
    return BrokerInfo(
        name=instance_of(info.name, info.type),
        service_type=info.type,
        host=host,
        port=info.port,
        tls=info.type.lower() == SECURE_MQTT_TYPE,
        server=server,
        addresses=addresses,
        priority=_int(txt.get("priority"), info.priority or 0),
        order=order,
        txt=txt,
    )


def _matches(broker: BrokerInfo, preference: str) -> bool:
    wanted = preference.lower().rstrip(".")
    return wanted in (broker.name.lower(), f"{broker.name}.{broker.service_type}".lower().rstrip("."))


def choose_broker(candidates: Sequence[BrokerInfo], preference: Optional[str] = None) -> Optional[BrokerInfo]:
    """The documented rule: the configured preference by instance name; then TLS before plain, then the lowest
    priority, then the first seen. (A broker often advertises both types under one name: TLS wins there too.)"""
    preferred = [b for b in candidates if preference and _matches(b, preference)]
    pool = preferred or list(candidates)
    if not pool:
        return None
    return min(pool, key=lambda b: (0 if b.tls else 1, b.priority, b.order))


def find_broker(
    cfg: Optional["DiscoveryConfig"] = None,
    timeout: Optional[float] = None,
    *,
    require_tls: bool = False,
    service_types: Sequence[str] = (MQTT_TYPE, SECURE_MQTT_TYPE),
) -> Optional[BrokerInfo]:
    """Browse ``_mqtt._tcp`` and ``_secure-mqtt._tcp`` and pick one by :func:`choose_broker`.

    Listens ``timeout`` seconds (default ``cfg.browse_timeout_s``), returning early only when the preferred broker
    shows up. ``require_tls`` (pass ``cfg.mqtt.tls``) ignores plain brokers: a node configured with a CA must not
    send its credentials in clear to whatever answers on the LAN. None when nothing suitable answered.
    """
    interfaces = cfg.interfaces if cfg is not None else None
    preference = cfg.broker_preference if cfg is not None else None
    if timeout is None:
        timeout = cfg.browse_timeout_s if cfg is not None else 3.0
    found: dict[str, BrokerInfo] = {}
    order: dict[str, int] = {}
    lock = threading.Lock()
    preferred_seen = threading.Event()

    def on_change(kind: str, service_type: str, name: str, info: Optional[ServiceInfo]) -> None:
        key = name.lower()
        with lock:
            if kind == "removed":
                found.pop(key, None)
                return
            order.setdefault(key, len(order))
            assert info is not None
            broker = _broker_from_info(info, order[key])
            if broker is None or (require_tls and not broker.tls):
                return
            found[key] = broker
            if preference and _matches(broker, preference):
                preferred_seen.set()

    zc = new_zeroconf(interfaces)
    tracker = _ServiceTracker(zc, list(service_types), on_change)
    try:
        tracker.start()
        if preferred_seen.wait(timeout):
            # The same responder usually answers for its other service type in the same breath: let it land so
            # the TLS twin of a preferred plain broker still wins.
            time.sleep(0.3)
    finally:
        tracker.cancel()
        zc.close()
    with lock:
        candidates = list(found.values())
    chosen = choose_broker(candidates, preference)
    if chosen is not None:
        if preference and not _matches(chosen, preference):
            log.warning("preferred broker %r not found over mDNS; using %r", preference, chosen.name)
        log.info("mDNS: chose broker %r at %s (tls=%s) among %d", chosen.name,
                 format_endpoint(chosen.host, chosen.port), chosen.tls, len(candidates))
    return chosen

