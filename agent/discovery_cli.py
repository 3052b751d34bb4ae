"""``cv-worker discover``: list the cv-worker nodes on the local network, cross-checked with their MQTT status.

mDNS says a node is *there*; its retained birth message ``{prefix}/nodes/{node_id}/status`` says whether its agent
is connected to the broker (``online``), lost it (``offline``, the will) or shut down (``stopped``). A node found
over mDNS whose broker cannot be reached gets status ``unknown`` with the reason, never a traceback.

Wired into agent/cli.py with ``add_parser(sub, [common])``; runnable alone as ``python -m agent.discovery_cli``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets as _secrets
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

from pydantic import Field

from agent.discovery import (
    DiscoveryError,
    NodeEvent,
    NodeInfo,
    browse,
    find_nodes,
    format_endpoint,
    parse_endpoint,
)

if TYPE_CHECKING:  # pragma: no cover
    from agent.config import AgentConfig, MqttConfig

log = logging.getLogger("cv_worker.discovery")

EXIT_OK, EXIT_NONE_FOUND, EXIT_USAGE = 0, 1, 2
STATES = ("online", "offline", "stopped")

DESCRIPTION = """\
List the cv-worker nodes that answer over mDNS (DNS-SD service _cv-worker._tcp) on the local network: node id,
addresses, version, role, accelerators, models, and status. Status comes from each node's retained MQTT birth
message ({prefix}/nodes/{node_id}/status) on the broker the node advertises (or the [mqtt] broker of the config
when it names a host, or --broker), using the config's TLS and user settings: online, offline (the node lost its
broker), stopped (shut down cleanly), or unknown (broker unreachable, or no birth message; see status_detail).

A password from the config is only sent to an mDNS-advertised broker over TLS; for a plain-text broker name it
with mqtt.host or --broker. mDNS works on one network segment: routers do not forward it."""

EPILOG = """\
examples:
  cv-worker discover                          table of the nodes found within 3 s
  cv-worker discover --timeout 8 --json       JSON list, for scripts and integrations
  cv-worker discover --role build             only training (build) peers
  cv-worker discover --watch                  follow nodes as they appear, change and leave (Ctrl-C stops)
  cv-worker discover --watch --json           the same as JSON lines
  cv-worker discover -i eth0 --broker 10.0.0.5:1883

exit status: 0 at least one node found, 1 none found, 2 usage error"""


class DiscoveredNode(NodeInfo):
    """A node as ``discover --json`` prints it: the mDNS view plus the MQTT status cross-check."""

    status: str = Field("unknown", description="online, offline, stopped (from the birth message) or unknown.")
    status_detail: str = Field("", description="Why the status is unknown, or which broker confirmed it.")


def add_parser(
    subparsers: argparse._SubParsersAction, parents: Sequence[argparse.ArgumentParser] = ()
) -> argparse.ArgumentParser:
    """Add the ``discover`` sub-command; its handler is ``func(args, cfg)`` like the other commands."""
    p = subparsers.add_parser(
        "discover",
        parents=list(parents),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="find cv-worker nodes on the local network (mDNS)",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    p.add_argument("--timeout", "-t", type=float, metavar="SECONDS",
                   help="how long to listen (default 3; with --watch: until Ctrl-C)")
    p.add_argument("--json", action="store_true", help="print JSON (with --watch: one event per line)")
    p.add_argument("--watch", "-w", action="store_true", help="print nodes as they appear, change and disappear")
    p.add_argument("--role", choices=["edge", "build"], help="only nodes with this role")
    p.add_argument("--interface", "-i", action="append", metavar="NAME|ADDR",
                   help="listen on this interface or address only (repeatable; default: discovery.interfaces)")
    p.add_argument("--broker", metavar="HOST[:PORT]",
                   help="check status on this broker instead of the one each node advertises")
    p.add_argument("--no-status", action="store_true", help="skip the MQTT status cross-check")
    p.add_argument("--mqtt-timeout", type=float, default=3.0, metavar="SECONDS",
                   help="connect and read timeout of the status check per broker (default 3)")
    p.set_defaults(func=run_discover)
    return p


def run_discover(args: argparse.Namespace, cfg: Optional["AgentConfig"]) -> int:
    """Run ``discover``; returns the exit status."""
    from agent.config import DiscoveryConfig, MqttConfig

    disc = cfg.discovery if cfg is not None else DiscoveryConfig()
    mqtt_cfg = cfg.mqtt if cfg is not None else MqttConfig()
    interfaces = getattr(args, "interface", None) or disc.interfaces
    broker: Optional[tuple[str, int]] = None
    if getattr(args, "broker", None):
        broker = parse_endpoint(args.broker) or parse_endpoint(f"{args.broker}:{mqtt_cfg.effective_port}")
        if broker is None:
            print(f"cv-worker discover: --broker must be HOST or HOST:PORT, not {args.broker!r}", file=sys.stderr)
            return EXIT_USAGE
    try:
        if getattr(args, "watch", False):
            return _watch(args, interfaces)
        timeout = args.timeout if args.timeout is not None else 3.0
        found = find_nodes(timeout, interfaces=interfaces, role=args.role)
    except DiscoveryError as e:
        print(f"cv-worker discover: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"cv-worker discover: cannot open mDNS sockets: {e}", file=sys.stderr)
        return EXIT_USAGE
    nodes = [DiscoveredNode(**n.model_dump()) for n in found]
    if nodes and not getattr(args, "no_status", False):
        cross_check(nodes, mqtt_cfg, broker=broker, timeout=args.mqtt_timeout)
    elif getattr(args, "no_status", False):
        for n in nodes:
            n.status_detail = "not checked (--no-status)"
    if args.json:
        print(json.dumps([n.model_dump(mode="json") for n in nodes], indent=2))
    else:
        _print_table(nodes, timeout, interfaces)
    return EXIT_OK if nodes else EXIT_NONE_FOUND


# -- MQTT status cross-check ---------------------------------------------------------------------------------------


def status_topic(prefix: str, node_id: str) -> Optional[str]:
    """The birth-message topic, or None when TXT values would make it a wildcard or a system topic."""
    from agent.config import SAFE_TOKEN_RE

    if not SAFE_TOKEN_RE.match(node_id):
        return None
    if not prefix or any(c in prefix for c in "#+\0") or prefix.startswith(("$", "/")) or prefix.endswith("/"):
        return None
    return f"{prefix}/nodes/{node_id}/status"


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def cross_check(
    nodes: Sequence[DiscoveredNode],
    mqtt_cfg: "MqttConfig",
    *,
    broker: Optional[tuple[str, int]] = None,
    timeout: float = 3.0,
) -> None:
    """Fill ``status`` / ``status_detail`` of each node from its retained birth message; never raises."""
    # One connection per broker: nodes of a fleet usually share one.
    groups: dict[tuple[str, int, bool, bool], list[tuple[DiscoveredNode, str]]] = {}
    for node in nodes:
        topic = status_topic(node.prefix, node.node_id)
        if topic is None:
            node.status, node.status_detail = "unknown", "node id or topic prefix in TXT is not a safe topic"
            continue
        if broker is not None:
            host, port, tls, advertised = broker[0], broker[1], mqtt_cfg.tls, False
        elif mqtt_cfg.host:
            host, port, tls, advertised = mqtt_cfg.host, mqtt_cfg.effective_port, mqtt_cfg.tls, False
        else:
            ep = node.mqtt_endpoint()
            if ep is None:
                node.status, node.status_detail = "unknown", "the node advertises no broker"
                continue
            host, port = ep
            # A node using a broker on its own loopback advertises 127.0.0.1: reach it at the node's address.
            if _is_loopback(host) and node.addresses and not all(_is_loopback(a) for a in node.addresses):
                host = node.addresses[0]
            tls, advertised = node.tls or mqtt_cfg.tls, True
        groups.setdefault((host, port, tls, advertised), []).append((node, topic))

    for (host, port, tls, advertised), members in groups.items():
        endpoint = format_endpoint(host, port)
        # Never hand the password to a broker we only know from an unauthenticated mDNS answer, unless TLS
        # (with certificate checks) proves who it is.
        send_password = not advertised or (tls and not mqtt_cfg.tls_insecure)
        try:
            got = fetch_retained(host, port, [t for _, t in members], mqtt_cfg, tls=tls,
                                 send_password=send_password, timeout=timeout)
        except Exception as e:
            detail = f"broker {endpoint} unreachable: {_reason(e)}"
            if not send_password and mqtt_cfg.username and (mqtt_cfg.password or mqtt_cfg.password_file):
                detail += " (password withheld from a plain-text broker known only from mDNS: use --broker)"
            for node, _ in members:
                node.status, node.status_detail = "unknown", detail
            continue
        for node, topic in members:
            payload = got.get(topic)
            if payload is None:
                node.status, node.status_detail = "unknown", f"no birth message on {endpoint} ({topic})"
                continue
            try:
                state = json.loads(payload).get("state")
            except (ValueError, AttributeError):
                state = None
            if state in STATES:
                node.status, node.status_detail = state, f"birth message on {endpoint}"
            else:
                node.status, node.status_detail = "unknown", f"unreadable birth message on {endpoint}"


def _reason(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text.splitlines()[0][:200]


class _StatusReadError(Exception):
    pass


def fetch_retained(
    host: str,
    port: int,
    topics: Sequence[str],
    mqtt_cfg: "MqttConfig",
    *,
    tls: bool = False,
    send_password: bool = True,
    timeout: float = 3.0,
) -> dict[str, bytes]:
    """Connect, subscribe to ``topics`` and return the retained payloads received; raises on connect failure."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"cvw-discover-{os.getpid()}-{_secrets.token_hex(3)}",
                         protocol=mqtt.MQTTv5)
    if mqtt_cfg.username:
        client.username_pw_set(mqtt_cfg.username, mqtt_cfg.read_password() if send_password else None)
    if tls:
        client.tls_set(
            ca_certs=str(mqtt_cfg.tls_ca) if mqtt_cfg.tls_ca else None,
            certfile=str(mqtt_cfg.tls_cert) if mqtt_cfg.tls_cert else None,
            keyfile=str(mqtt_cfg.tls_key) if mqtt_cfg.tls_key else None,
        )
        client.tls_insecure_set(mqtt_cfg.tls_insecure)
    client.connect_timeout = timeout
    connected, subscribed = threading.Event(), threading.Event()
    result: dict[str, object] = {}
    got: dict[str, bytes] = {}
    lock = threading.Lock()

    def on_connect(c: mqtt.Client, userdata: object, flags: object, reason_code: object, props: object) -> None:
        result["rc"] = reason_code
        connected.set()

    def on_subscribe(c: mqtt.Client, userdata: object, mid: int, reason_codes: object, props: object) -> None:
        subscribed.set()

    def on_message(c: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if msg.retain:
            with lock:
                got[msg.topic] = msg.payload

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    deadline = time.monotonic() + timeout
    client.connect(host, port, keepalive=max(5, int(timeout) + 5))
    client.loop_start()
    try:
        if not connected.wait(max(0.0, deadline - time.monotonic())):
            raise _StatusReadError("no CONNACK in time")
        rc = result.get("rc")
        if getattr(rc, "is_failure", False):
            raise _StatusReadError(f"connection refused: {rc}")
        client.subscribe([(t, 1) for t in topics])
        if not subscribed.wait(max(0.0, deadline - time.monotonic())):
            raise _StatusReadError("no SUBACK in time")
        # Retained messages follow the SUBACK at once; wait briefly for stragglers unless all have arrived.
        grace_end = min(deadline, time.monotonic() + 0.5)
        while time.monotonic() < grace_end:
            with lock:
                if len(got) >= len(topics):
                    break
            time.sleep(0.02)
        with lock:
            return dict(got)
    finally:
        client.disconnect()
        client.loop_stop()


# -- output --------------------------------------------------------------------------------------------------------


def _short_list(items: Sequence[str], total: Optional[int] = None, keep: int = 4) -> str:
    total = max(total or 0, len(items))
    shown = ", ".join(items[:keep])
    more = total - min(len(items), keep)
    return f"{shown} (+{more})" if more > 0 else (shown or "-")


def _print_table(nodes: Sequence[DiscoveredNode], timeout: float, interfaces: Optional[Sequence[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        # Piped or captured: rich would assume 80 columns and squeeze seven columns into unreadable slivers.
        console = Console(width=160)
    if not nodes:
        where = ", ".join(interfaces) if interfaces else "all interfaces"
        console.print(f"No cv-worker node answered within {timeout:g} s on {where}. Is the agent running with "
                      "discovery.enabled, on this network segment? Try a longer --timeout.")
        return
    colors = {"online": "green", "offline": "red", "stopped": "yellow", "unknown": "dim"}
    table = Table(title=f"cv-worker nodes ({len(nodes)})")
    for col in ("node id", "addresses", "version", "role", "accelerators", "models", "status"):
        table.add_column(col)
    for n in nodes:
        node_id = n.node_id if n.name == n.node_id else f"{n.node_id}\n[dim]as {n.name}[/dim]"
        status = f"[{colors.get(n.status, 'dim')}]{n.status}[/]"
        table.add_row(node_id, "\n".join(n.addresses) or "-", n.version or "-", n.role,
                      _short_list(n.accel), _short_list(n.models, n.models_total), status)
    console.print(table)
    details = [(n.node_id, n.status_detail) for n in nodes if n.status == "unknown" and n.status_detail]
    for node_id, detail in details:
        console.print(f"[dim]{node_id}: status unknown: {detail}[/dim]")


def _watch(args: argparse.Namespace, interfaces: Optional[Sequence[str]]) -> int:
    seen = False
    for event in browse(args.timeout, interfaces=interfaces):
        if args.role and event.node is not None and event.node.role != args.role:
            continue
        seen = True
        if args.json:
            print(event.model_dump_json(), flush=True)
        else:
            print(_event_line(event), flush=True)
    return EXIT_OK if seen else EXIT_NONE_FOUND


def _event_line(event: NodeEvent) -> str:
    n = event.node
    if n is None:
        return f"{event.kind:8} {event.name}"
    when = time.strftime("%H:%M:%S", time.localtime(event.at))
    return (f"{when} {event.kind:8} {n.node_id} ({n.name}) {', '.join(n.addresses)} v{n.version} role={n.role} "
            f"accel={','.join(n.accel) or '-'} models={_short_list(n.models, n.models_total)}")


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m agent.discovery_cli [discover] ...`` for use before agent/cli.py wires the command in."""
    from agent.config import ConfigError, load_config

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", metavar="PATH", help="config file (default: $CV_WORKER_CONFIG or /etc/...)")
    parser = argparse.ArgumentParser(prog="cv-worker")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_parser(sub, [common])
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "discover":
        argv.insert(0, "discover")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args, cfg)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
