"""``cv-worker trainer``: run this machine as a build-system peer that trains models for the nodes."""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any

EPILOG = """\
examples:
  cv-worker trainer --config /etc/cv-worker/config.toml   train for the nodes of this broker (GPU when torch sees one)
  cv-worker trainer --device cpu --http-port 8765
  cv-worker trainer --list-plugins                         the trainer plugins installed here

What it does: subscribes to {prefix}/trainers/jobs/+/request as one of the shared-subscription group
[trainer] group (several peers balance the queue) and to {prefix}/trainers/peers/<peer id>/jobs/+/request,
advertises role=build over mDNS (nodes with no [train] build_peer find it there), trains with the job's plugin,
and serves each finished package read-only at http://<host>:<port>/artifacts/<job>/<name>-<version>.tar.gz
(or PUTs it to the job's `model` URL). Progress goes to {prefix}/trainers/jobs/<job>/status and to the job's
`status` URL. A node's `train` job does all of this for you; see docs/training.md.

It reads the same config file as the agent: [mqtt] for the broker, [trainer] for itself (peer_id defaults to
<node_id>-build and state_dir to <state_dir>/trainer, so a node and a trainer can share a machine).
Needs the train extra: pip install 'cv-worker[train]'.
"""


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("trainer", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="run a build-system peer that trains models for the nodes",
                       description="Run a build-system peer in the foreground: take `train` jobs from the "
                       "training queue over MQTT, train them (GPU when torch sees one, else CPU), report progress "
                       "and serve the finished model packages. Stop it with SIGTERM (Ctrl-C).", epilog=EPILOG)
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override trainer.device")
    s.add_argument("--http-port", type=int, metavar="PORT", help="override trainer.http_port (0: any free port)")
    s.add_argument("--group", metavar="NAME", help="override trainer.group (the shared queue this peer serves)")
    s.add_argument("--peer-id", metavar="ID", help="override trainer.peer_id")
    s.add_argument("--list-plugins", action="store_true", help="list the installed trainer plugins and exit")
    s.set_defaults(func=cmd_trainer)


def cmd_trainer(args: argparse.Namespace, cfg: Any) -> int:
    from agent.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, _err

    if args.list_plugins:
        from agent.trainer.plugins import ENTRY_POINT_GROUP, available

        plugins = available()
        if not plugins:
            print(f"no trainer plugins installed (entry point group {ENTRY_POINT_GROUP})")
        for name, ep in sorted(plugins.items()):
            print(f"{name}\t{ep.value}")
        return EXIT_OK
    t = cfg.trainer
    for attr, value in (("device", args.device), ("http_port", args.http_port), ("group", args.group),
                        ("peer_id", args.peer_id)):
        if value is not None:
            setattr(t, attr, value)
    try:
        from agent.trainer.config import TrainerConfig

        cfg.trainer = TrainerConfig.model_validate(t.model_dump())
    except ValueError as e:
        _err(f"bad option: {e}")
        return EXIT_USAGE
    if importlib.util.find_spec("torch") is None:
        _err("PyTorch is not installed, so this machine cannot train: pip install 'cv-worker[train]' "
             "(it pins torch==2.13.0)")
        return EXIT_FAILED

    from agent.logs import setup_logging
    from agent.sdnotify import notifier
    from agent.trainer.peer import TrainerPeer

    setup_logging(cfg.logging.level, cfg.logging.journal)
    try:
        peer = TrainerPeer(cfg)
    except OSError as e:
        _err(f"cannot open the trainer's state directory: {e} (set [trainer] state_dir or run as the service user)")
        return EXIT_FAILED
    try:
        return peer.run_forever(notify=notifier())
    except OSError as e:  # most likely the artifact server's port
        _err(f"cannot start the build peer: {e} (is trainer.http_port {cfg.trainer.http_port} in use? "
             "--http-port 0 takes any free port)")
        return EXIT_FAILED
