"""The ``cv-worker`` command line: the daemon, a controller-side client, and tools to inspect a node."""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from agent import __version__
from agent.config import AgentConfig, ConfigError, load_config

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_WAIT_TIMEOUT = 0, 1, 2, 3, 4

EPILOG = """\
examples:
  cv-worker run --config /etc/cv-worker/config.toml      run the agent (what systemd starts)
  cv-worker submit node.info --node pi-kitchen --wait   ask a node about itself and wait for the answer
  cv-worker submit debug.sleep --pool p1 --param seconds=5 --wait
  cv-worker jobs --state FAILED                          jobs in this node's local state
  cv-worker config check                                 validate the config, print it with secrets masked
  cv-worker trainer                                      run a build-system peer that trains for the nodes

The config file is --config PATH, else $CV_WORKER_CONFIG, else /etc/cv-worker/config.toml; every field can be
overridden by an environment variable CV_WORKER_<SECTION>__<FIELD> (e.g. CV_WORKER_MQTT__HOST=broker.lan).
Protocol: docs/protocol.md, or `cv-worker schema`.
"""


def _err(msg: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {msg}")


def _load(args: argparse.Namespace) -> AgentConfig:
    cfg = load_config(getattr(args, "config", None))
    if getattr(args, "log_level", None):
        cfg.logging.level = args.log_level.upper()
    return cfg


# -- run ----------------------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace, cfg: AgentConfig) -> int:
    from agent.logs import setup_logging
    from agent.node import Node
    from agent.sdnotify import notifier

    setup_logging(cfg.logging.level, cfg.logging.journal)
    # A crash inside a native runtime (or SIGABRT from a supervisor that gave up waiting) leaves every thread's
    # Python stack in the journal instead of nothing.
    faulthandler.enable()
    try:
        node = Node(cfg)
    except OSError as e:
        _err(f"cannot open the state directory {cfg.state_dir}: {e.strerror} "
             "(set state_dir or run as the service user)")
        return EXIT_FAILED
    return node.run_forever(notify=notifier())


# -- submit -------------------------------------------------------------------------------------------------


def parse_params(pairs: list[str], params_json: Optional[str]) -> dict[str, Any]:
    """``k=v`` pairs; a value that parses as JSON is taken as JSON (numbers, booleans, lists), else as a string."""
    params: dict[str, Any] = {}
    if params_json:
        text = Path(params_json[1:]).read_text() if params_json.startswith("@") else params_json
        loaded = json.loads(text)
        if not isinstance(loaded, dict):
            raise ValueError("--params must be a JSON object")
        params.update(loaded)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--param expects key=value, got {pair!r}")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


def broker_address(cfg: AgentConfig) -> tuple[str, int]:
    return cfg.mqtt.host or "localhost", cfg.mqtt.effective_port


def cmd_submit(args: argparse.Namespace, cfg: AgentConfig) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from agent.client import Controller, ControllerError

    # With --json, stdout carries only the JSON document; people-facing output goes to stderr.
    console = Console(highlight=False, stderr=bool(args.json))
    try:
        params = parse_params(args.param or [], args.params)
    except (ValueError, OSError) as e:
        _err(f"bad parameters: {e}")
        return EXIT_USAGE
    node = args.node if args.node or args.pool else cfg.node_id
    host, port = broker_address(cfg)
    try:
        ctl = Controller(cfg.mqtt, host, port).connect()
    except ControllerError as e:
        _err(str(e))
        return EXIT_UNREACHABLE
    try:
        job_id = ctl.submit(args.type, params, node=None if args.pool else node, pool=args.pool, job_id=args.job_id,
                            timeout_s=args.timeout, priority=args.priority)
        target = f"pool {args.pool}" if args.pool else f"node {node}"
        if not args.wait:
            # The id alone on stdout, so scripts can do ID=$(cv-worker submit ...); the sentence goes to stderr.
            Console(stderr=True, highlight=False).print(f"submitted {job_id} ({args.type}) to {target}")
            print(job_id)
            return EXIT_OK
        time.sleep(0.2)
        if not args.pool and ctl.node_states.get(node, {}).get("state") in ("offline", "stopped"):
            console.print(f"[yellow]node {node} is {ctl.node_states[node]['state']}; the job runs when it is back[/]")
        with Progress(TextColumn("[bold]{task.fields[job]}[/] {task.description}"), BarColumn(),
                      TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(), console=console,
                      transient=False) as progress:
            task = progress.add_task("submitted", total=100, job=job_id)

            def update(outcome: Any) -> None:
                if outcome.last:
                    p = outcome.last.get("progress")
                    details = outcome.last.get("details") or {}
                    extra = " ".join(f"{k}={v}" for k, v in details.items() if not isinstance(v, (dict, list)))
                    progress.update(task, description=f"{outcome.last['state']} {extra}"[:80],
                                    completed=(p or 0) * 100)

            try:
                outcome = ctl.wait(job_id, timeout=args.wait_timeout, on_update=update)
            except TimeoutError as e:
                _err(str(e))
                return EXIT_WAIT_TIMEOUT
            update(outcome)
        last = outcome.last or {}
        if args.json:
            print(json.dumps({"status": last, "results": outcome.results}, indent=2))
        else:
            for r in outcome.results:
                body = {k: v for k, v in r.items() if k not in ("job_id", "node_id", "seq", "final", "ts")}
                console.print_json(json.dumps(body))
        if last.get("state") == "SUCCEEDED":
            console.print(f"[green]{job_id} SUCCEEDED[/] on node {last.get('node_id')}")
            return EXIT_OK
        err = last.get("error") or {}
        _err(f"{job_id} {last.get('state')}: {err.get('code')}: {err.get('message')}")
        return EXIT_FAILED
    except ControllerError as e:
        _err(str(e))
        return EXIT_USAGE
    finally:
        ctl.close()


# -- local state --------------------------------------------------------------------------------------------


def _open_state(cfg: AgentConfig) -> Any:
    from agent.journal import Journal
    from agent.state import StateStore

    if not Journal(cfg.state_dir, read_only=True).exists() and not (cfg.state_dir / "jobs.json").exists():
        return None
    return StateStore(cfg.state_dir, read_only=True)


def _ago(ts: Optional[float]) -> str:
    if not ts:
        return "-"
    d = time.time() - ts
    return f"{d:.0f}s ago" if d < 120 else f"{d / 60:.0f}m ago" if d < 7200 else f"{d / 3600:.1f}h ago"


def cmd_jobs(args: argparse.Namespace, cfg: AgentConfig) -> int:
    from rich.console import Console
    from rich.table import Table

    state = _open_state(cfg)
    jobs = state.all_jobs() if state else []
    if args.state:
        jobs = [j for j in jobs if j["state"] == args.state.upper()]
    jobs.sort(key=lambda j: j.get("updated") or 0, reverse=True)
    jobs = jobs[: args.limit]
    if args.json:
        print(json.dumps(jobs, indent=2, default=str))
        return EXIT_OK
    table = Table(title=f"jobs on {cfg.node_id} ({cfg.state_dir})")
    table.add_column("job id", no_wrap=True)
    for col in ("type", "state", "progress", "updated", "error"):
        table.add_column(col)
    colors = {"SUCCEEDED": "green", "FAILED": "red", "REJECTED": "red", "TIMED_OUT": "yellow", "CANCELED": "yellow"}
    for j in jobs:
        err = j.get("error") or {}
        prog = f"{j['progress'] * 100:.0f}%" if j.get("progress") is not None else "-"
        color = colors.get(j["state"], "cyan")
        table.add_row(j["job_id"], j["type"], f"[{color}]{j['state']}[/]", prog, _ago(j.get("updated")),
                      err.get("code") or "")
    Console().print(table)
    if not jobs:
        print("no jobs" + (f" in state {args.state.upper()}" if args.state else ""))
    return EXIT_OK


def cmd_job(args: argparse.Namespace, cfg: AgentConfig) -> int:
    state = _open_state(cfg)
    job = state.get_job(args.job_id) if state else None
    if job is None:
        _err(f"no job {args.job_id!r} in {cfg.state_dir} (finished jobs are pruned after "
             f"{cfg.jobs.retention_days} days or {cfg.jobs.retention_count} jobs)")
        return EXIT_FAILED
    if args.result:
        print(json.dumps(state.read_results(args.job_id), indent=2, default=str))
    else:
        print(json.dumps(job, indent=2, default=str))
    return EXIT_OK


def cmd_status(args: argparse.Namespace, cfg: AgentConfig) -> int:
    from rich.console import Console

    console = Console(highlight=False)
    runtime_path = cfg.state_dir / "runtime.json"
    runtime: dict[str, Any] = {}
    if runtime_path.exists():
        runtime = json.loads(runtime_path.read_text())
    alive = False
    if runtime.get("pid"):
        try:
            os.kill(int(runtime["pid"]), 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
    state = _open_state(cfg)
    jobs = state.all_jobs() if state else []
    running = [j for j in jobs if j["state"] == "IN_PROGRESS"]
    queued = [j for j in jobs if j["state"] == "QUEUED"]
    info = {
        "node_id": cfg.node_id, "agent_running": alive, "pid": runtime.get("pid") if alive else None,
        "broker": runtime.get("mqtt"), "connected": runtime.get("connected") if alive else False,
        "running": [{"job_id": j["job_id"], "type": j["type"], "progress": j.get("progress")} for j in running],
        "queued": len(queued), "outbox_depth": state.outbox_len() if state else 0, "state_dir": str(cfg.state_dir),
        "http": _http_url(cfg) if cfg.http.enabled else None,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    console.print(f"node [bold]{cfg.node_id}[/]: agent " + ("[green]running[/]" if alive else "[red]not running[/]")
                  + (f" (pid {info['pid']})" if alive else ""))
    if alive:
        link = "[green]connected[/]" if info["connected"] else "[red]disconnected[/]"
        console.print(f"broker {info['broker']}: {link}")
    for j in info["running"]:
        p = f"{j['progress'] * 100:.0f}%" if j["progress"] is not None else "…"
        console.print(f"  running {j['job_id']} ({j['type']}) {p}")
    console.print(f"{info['queued']} queued, {len(running)} running, outbox {info['outbox_depth']} message(s)")
    if info["http"]:
        token = cfg.http.resolve_token_file(cfg.state_dir)
        console.print(f"web console and HTTP API: {info['http']} (bearer token in {token})")
    return EXIT_OK


def _http_url(cfg: AgentConfig) -> str:
    host = cfg.http.bind
    if host in ("0.0.0.0", "::"):
        host = socket.gethostname()
    elif ":" in host:
        host = f"[{host}]"
    return f"{'https' if cfg.http.tls else 'http'}://{host}:{cfg.http.port}/"


# -- config, schema -----------------------------------------------------------------------------------------


def cmd_config_check(args: argparse.Namespace, cfg: AgentConfig) -> int:
    print(f"# effective configuration (from {cfg.source}); secrets masked")
    if args.json:
        print(json.dumps(cfg.masked(), indent=2))
    else:
        print(to_toml(cfg.masked()))
    return EXIT_OK


def to_toml(data: dict[str, Any]) -> str:
    """Minimal TOML writer for printing the effective config (None values are shown as comments)."""
    def val(v: Any) -> str:
        return json.dumps(v)

    lines, sections = [], []
    for k, v in data.items():
        if isinstance(v, dict):
            sections.append((k, v))
        elif v is None:
            lines.append(f"# {k} = (unset)")
        else:
            lines.append(f"{k} = {val(v)}")
    for name, sec in sections:
        lines.append(f"\n[{name}]")
        for k, v in sec.items():
            lines.append(f"# {k} = (unset)" if v is None else f"{k} = {val(v)}")
    return "\n".join(lines)


def schema_file_name(name: str) -> str:
    return f"{name.replace('/', '.')}.schema.json"


def cmd_schema(args: argparse.Namespace, cfg: Optional[AgentConfig]) -> int:
    from agent.docs_gen import all_schemas, protocol_markdown

    if args.markdown:
        print(protocol_markdown())
        return EXIT_OK
    schemas = all_schemas()
    if args.name:
        if args.name not in schemas:
            _err(f"no schema {args.name!r}; choose from: {', '.join(schemas)}")
            return EXIT_USAGE
        schemas = {args.name: schemas[args.name]}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, schema in schemas.items():
            (out / schema_file_name(name)).write_text(json.dumps(schema, indent=2) + "\n")
        print(f"wrote {len(schemas)} schemas to {out}")
    else:
        print(json.dumps(schemas if not args.name else schemas[args.name], indent=2))
    return EXIT_OK


# -- parser -------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", metavar="PATH",
                        help="config file (default: $CV_WORKER_CONFIG or /etc/cv-worker/config.toml)")
    common.add_argument("--log-level", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="override logging.level")

    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="cv-worker", description="Computer-vision worker node controlled over MQTT.",
                                epilog=EPILOG, formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"cv-worker {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("run", parents=[common], formatter_class=fmt, help="run the agent (the daemon)",
                       description="Run the agent in the foreground: connect to the broker, take jobs, report "
                       "status. systemd runs this; stop it with SIGTERM (Ctrl-C).")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("submit", parents=[common], formatter_class=fmt, help="publish a job and follow it",
                       description="Publish a job request over MQTT (as a fleet controller would), then optionally "
                       "follow its progress and print its result. Uses the [mqtt] settings of the config.",
                       epilog="examples:\n  cv-worker submit node.info --node pi-kitchen --wait\n"
                       "  cv-worker submit job.cancel --node pi-kitchen --param job_id=abc --wait\n"
                       "  cv-worker submit debug.sleep --pool p1 --param seconds=3 --param steps=6 --wait\n\n"
                       "exit status: 0 succeeded (or submitted without --wait), 1 the job did not succeed, "
                       "2 usage error, 3 broker unreachable, 4 --wait-timeout reached")
    s.add_argument("type", help="job type, e.g. node.info, config.get, job.cancel, node.rebirth")
    s.add_argument("--param", "-p", action="append", metavar="KEY=VALUE",
                   help="a job parameter; VALUE is parsed as JSON when it can be (5, true, [1,2]), else a string")
    s.add_argument("--params", metavar="JSON|@FILE", help="all parameters as a JSON object (or @file.json)")
    target = s.add_mutually_exclusive_group()
    target.add_argument("--node", "-n", help="node id to send to (default: this machine's node_id)")
    target.add_argument("--pool", "-P", help="pool to send to; the broker picks one of its nodes")
    s.add_argument("--job-id", help="job id (default: generated); re-sending the same id is idempotent")
    s.add_argument("--timeout", type=float, metavar="SECONDS", help="timeout_s of the job once it starts")
    s.add_argument("--priority", type=int, default=0, help="-100..100, higher runs first (default 0)")
    s.add_argument("--wait", "-w", action="store_true", help="follow progress and print the result")
    s.add_argument("--wait-timeout", type=float, metavar="SECONDS", help="give up waiting after this long")
    s.add_argument("--json", action="store_true", help="print the final status and results as JSON")
    s.set_defaults(func=cmd_submit)

    s = sub.add_parser("jobs", parents=[common], formatter_class=fmt, help="list jobs in this node's local state",
                       description="List the jobs this node knows (its local state directory), newest first.")
    s.add_argument("--state", "-s", type=str.upper, metavar="STATE",
                   choices=["QUEUED", "IN_PROGRESS", "SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELED", "REJECTED"],
                   help="only jobs in this state (QUEUED, IN_PROGRESS, SUCCEEDED, FAILED, TIMED_OUT, CANCELED, "
                   "REJECTED)")
    s.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_jobs)

    s = sub.add_parser("job", parents=[common], formatter_class=fmt, help="show one job from local state",
                       description="Print one job's record (state, params, error, timestamps) as JSON.")
    s.add_argument("job_id")
    s.add_argument("--result", action="store_true", help="print the job's stored result messages instead (their "
                   "items name the annotated images and mask PNGs written or uploaded for each image)")
    s.set_defaults(func=cmd_job)

    s = sub.add_parser("status", parents=[common], formatter_class=fmt, help="what the node is doing now",
                       description="Whether the agent runs, its broker connection, running and queued jobs, and "
                       "the outbox (messages waiting for the broker).")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("config", parents=[common], formatter_class=fmt, help="configuration tools")
    csub = s.add_subparsers(dest="config_command", metavar="ACTION")
    c = csub.add_parser("check", parents=[common], formatter_class=fmt, help="validate and print the config",
                        description="Load the config as the agent would, print the effective values with secrets "
                        "masked, or every validation error with its field path (exit status 2).")
    c.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    c.set_defaults(func=cmd_config_check)

    s = sub.add_parser("schema", formatter_class=fmt, help="JSON Schemas of the MQTT messages",
                       description="Print the JSON Schemas of every protocol message and job parameter set, "
                       "generated from the code (the same source as docs/protocol.md).")
    s.add_argument("name", nargs="?", help="one schema, e.g. JobRequest, JobStatus, params/node.info")
    s.add_argument("--out", metavar="DIR", help="write one NAME.schema.json file per schema into DIR")
    s.add_argument("--markdown", action="store_true", help="print the protocol document (docs/protocol.md)")
    s.set_defaults(func=cmd_schema, no_config=True)

    # Commands owned by the other packages register themselves the same way.
    from accelerators.cli import add_parsers as add_accelerator_parsers
    from agent.discovery_cli import add_parser as add_discover_parser
    from models.cli import add_parsers as add_model_parsers

    add_accelerator_parsers(sub, common)
    add_model_parsers(sub, common)
    add_discover_parser(sub, [common])
    __import__("provisioning.cli").cli.add_parsers(sub, common)  # cv-worker provision (issue 7)
    __import__("agent.trainer.cli").trainer.cli.add_parser(sub, common)  # cv-worker trainer (issue 8)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Optional[Callable[..., int]] = getattr(args, "func", None)
    if func is None:
        if getattr(args, "command", None) == "config":
            parser.parse_args(["config", "--help"])
        parser.print_help()
        return EXIT_USAGE
    cfg: Optional[AgentConfig] = None
    if not getattr(args, "no_config", False):
        try:
            cfg = _load(args)
        except ConfigError as e:
            _err(f"invalid configuration ({e.source}):")
            for path, msg in e.errors:
                print(f"  {path}: {msg.removeprefix('Value error, ')}", file=sys.stderr)
            return EXIT_USAGE
    try:
        return func(args, cfg)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
