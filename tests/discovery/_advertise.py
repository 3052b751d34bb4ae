"""A node's advertiser in its own process, for tests that put it in another network namespace.

Prints one JSON object per line (registered, conflict, updated, stopped); reads commands from stdin:
``models a,b,c`` updates TXT, ``stop`` (or end of input) unregisters and exits.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading

from agent.discovery import Advertiser, NameConflict

_out = threading.Lock()


def emit(**kw: object) -> None:
    # The conflict callback runs on zeroconf's thread: one whole line per write, never interleaved.
    with _out:
        sys.stdout.write(json.dumps(kw) + "\n")
        sys.stdout.flush()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--node-id", required=True)
    p.add_argument("--role", default="edge")
    p.add_argument("--models", default="")
    p.add_argument("--accel", default="cpu")
    p.add_argument("--mqtt")
    p.add_argument("--interface", action="append")
    args = p.parse_args()

    def on_conflict(c: NameConflict) -> None:
        emit(event="conflict", **c.model_dump())

    adv = Advertiser(args.node_id, role=args.role, models=[m for m in args.models.split(",") if m],
                     accel=[a for a in args.accel.split(",") if a], mqtt=args.mqtt, interfaces=args.interface,
                     on_conflict=on_conflict)
    adv.start()
    if not adv.wait_registered(10):
        emit(event="failed", error=adv.error)
        return 1
    emit(event="registered", name=adv.name, server=adv.server, txt=adv.txt)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "models":
            fut = adv.update(models=[m for m in arg.split(",") if m])
            if fut is not None:
                fut.result(5)
            emit(event="updated", name=adv.name, txt=adv.txt)
        elif cmd == "name":
            emit(event="name", name=adv.name, conflicts=[c.model_dump() for c in adv.conflicts])
        elif cmd == "stop":
            break
    adv.stop()
    emit(event="stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
