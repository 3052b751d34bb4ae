"""`cv-worker provision`: turn this machine (or a directory tree with --root) into a cv-worker node."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from provisioning.answers import ACCELERATORS, collect, is_interactive, load_answers_file
from provisioning.steps import Provisioner

HELP = """Set up this machine as a cv-worker node: identity, /etc/cv-worker/config.toml (mode 0640, secrets in
separate files), state and model directories owned by the service user, accelerator check, udev rules for
Coral/Movidius sticks, broker reachability (or mDNS discovery), the systemd unit (installed, enabled, started).

Interactive by default (each question shows its default); --yes or an answers file makes it non-interactive.
Running it again changes nothing that is already right, and it never replaces a config.toml its owner edited
unless --force is given."""

EPILOG = """examples:
  sudo cv-worker provision
  sudo cv-worker provision --yes --node-id pi-kitchen --broker broker.lan:8883 --tls-ca ca.pem \\
       --username pi-kitchen --password-file /root/pw --pools cameras --accelerator coral
  sudo cv-worker provision --answers node.toml          # keys: node_id, broker, username, password_file, ...
  cv-worker provision --root /tmp/img --yes --skip-broker-check --skip-accelerators   # build an image tree

exit status: 0 done (warnings allowed), 1 a step failed, 2 usage error"""


def add_parsers(subparsers: Any, common_parent: argparse.ArgumentParser) -> None:
    s = subparsers.add_parser("provision", parents=[common_parent], help="set this machine up as a node",
                              description=HELP, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--yes", "-y", "--non-interactive", dest="non_interactive", action="store_true",
                   help="ask nothing: defaults, answers file and flags only")
    s.add_argument("--answers", type=Path, metavar="FILE", help="answers as TOML or JSON (implies --yes)")
    s.add_argument("--root", type=Path, default=Path("/"), help="provision this directory tree (default /)")
    s.add_argument("--force", action="store_true", help="replace a config.toml that its owner edited")
    s.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
    s.add_argument("--node-id")
    s.add_argument("--broker", metavar="HOST[:PORT]", help="MQTT broker; empty: found over mDNS at run time")
    s.add_argument("--username")
    s.add_argument("--password-file", metavar="FILE", help="read the MQTT password from FILE")
    s.add_argument("--tls-ca", metavar="FILE", help="CA that signed the broker's certificate; enables TLS")
    s.add_argument("--pools", metavar="A,B", help="pools this node serves")
    s.add_argument("--accelerator", choices=ACCELERATORS, help="what this node has (default auto: detect)")
    s.add_argument("--user", help="service user (default cv-worker)")
    s.add_argument("--skip-broker-check", action="store_true")
    s.add_argument("--skip-accelerators", action="store_true")
    s.add_argument("--no-start", action="store_true", help="install and enable the unit but do not (re)start it")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.set_defaults(func=cmd_provision, no_config=True)


def cmd_provision(args: argparse.Namespace, _cfg: Any = None) -> int:
    flags = {k: getattr(args, k) for k in ("node_id", "broker", "username", "password_file", "tls_ca", "pools",
                                           "accelerator", "user")}
    try:
        file_data = load_answers_file(args.answers) if args.answers else {}
        answers = collect(args.root, file_data, flags, is_interactive(args.non_interactive or bool(args.answers)))
        answers.secret()  # fail now, not half way, when the password file is unreadable
    except (OSError, ValueError) as e:
        print(f"cv-worker provision: {e}", file=sys.stderr)
        return 2
    p = Provisioner(args.root, answers, force=args.force, dry_run=args.dry_run)
    steps: list[tuple[str, str, str]] = []

    def add(name: str, *results: tuple[str, str]) -> None:
        steps.extend((name, status, detail) for status, detail in results)

    try:
        add("identity", ("ok", f"node id {answers.node_id}"))
        add("user", p.user())
        add("directories", *p.directories())
        add("secrets", *(p.secrets() or [("skipped", "no password or CA given")]))
        add("config", p.config())
        if not args.skip_accelerators:
            add("accelerators", *p.accelerators())
        add("udev", p.udev())
        if not args.skip_broker_check:
            add("broker", p.broker())
        add("unit", *p.unit())
        p.save_marks()
        changed = any(s in ("created", "updated") for _, s, _ in steps)
        if not args.no_start:
            add("service", p.start(changed))
    except (OSError, ValueError) as e:
        add("error", ("failed", str(e)))
    failed = any(s == "failed" for _, s, _ in steps)
    if args.json:
        print(json.dumps({"answers": answers.public(), "steps": [dict(zip(("step", "status", "detail"), s))
                                                                 for s in steps], "failed": failed}, indent=2))
    else:
        print(f"cv-worker provision{' (dry run)' if args.dry_run else ''}: {args.root}")
        for name, status, detail in steps:
            print(f"  {name:<13} {status:<10} {detail}")
        print("done: " + ("with failures" if failed else "node ready" if not args.dry_run else "nothing changed"))
    return 1 if failed else 0
