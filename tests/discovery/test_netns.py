"""Discovery across a real link: two network namespaces joined by a veth pair, one process on each side."""

from __future__ import annotations

import json
import subprocess

from tests.discovery.conftest import NetnsPair, advertise_cmd, discover_cmd, subprocess_env


def test_advertise_update_remove_across_link(netns: NetnsPair, node_id: str) -> None:
    # The browser on host b starts first and keeps watching; the node on host a comes, changes, goes.
    watch = netns.spawn(netns.b, discover_cmd("--watch", "--json", "--timeout", "25"), "watch@b")
    node = netns.spawn(netns.a, advertise_cmd(node_id, "--models", "blazeface", "--accel", "cpu"), "node@a")
    node.expect(lambda e: e.get("event") == "registered", 10, "registration")

    added = watch.expect(lambda e: e.get("kind") == "added" and e["name"] == node_id, 10, "added event")
    info = added["node"]
    assert info["node_id"] == node_id and info["models"] == ["blazeface"] and info["accel"] == ["cpu"]
    # The address the other host can reach, not loopback and not this machine's real network.
    assert info["addresses"] == [netns.addr_a]

    node.send("models blazeface,ppocr-det")
    node.expect(lambda e: e.get("event") == "updated", 10, "update ack")
    updated = watch.expect(lambda e: e.get("kind") == "updated" and e["name"] == node_id, 10, "updated event")
    assert updated["node"]["models"] == ["blazeface", "ppocr-det"]

    node.send("stop")
    node.expect(lambda e: e.get("event") == "stopped", 10, "stop ack")
    removed = watch.expect(lambda e: e.get("kind") == "removed" and e["name"] == node_id, 5, "removed event")
    assert removed["node"]["node_id"] == node_id
    watch.close(timeout=0)


def test_same_node_id_on_two_hosts(netns: NetnsPair, node_id: str) -> None:
    first = netns.spawn(netns.a, advertise_cmd(node_id, "--models", "on-a"), "first@a")
    reg_a = first.expect(lambda e: e.get("event") == "registered", 10, "registration")
    assert reg_a["name"] == node_id
    second = netns.spawn(netns.b, advertise_cmd(node_id, "--models", "on-b"), "second@b")
    second.expect(lambda e: e.get("event") == "registered", 10, "registration")

    # One of them reports having been renamed to "<id>-2" (normally the late one, at probe time).
    def conflict(e: dict) -> bool:
        return e.get("event") == "conflict" and e["renamed"]

    renamed = None
    for proc in (second, first):
        # The report may have come before the "registered" line (probe-time rename) or after it (tie-break).
        earlier = [e for e in proc.seen if conflict(e)]
        if earlier:
            renamed = earlier[0]
            break
        try:
            renamed = proc.expect(conflict, 6 if proc is second else 1, "conflict report")
            break
        except AssertionError:
            continue
    assert renamed is not None, f"no conflict reported: a={first.seen} b={second.seen}"
    assert renamed["final"] == f"{node_id}-2" and renamed["requested"] == node_id
    print(f"conflict resolved: {'second' if renamed in second.seen else 'first'} node renamed: {renamed}")

    # A third party on host b sees both, with each host's own TXT and address.
    out = subprocess.run(["ip", "netns", "exec", netns.b, *discover_cmd("--json", "--timeout", "3", "--no-status")],
                         capture_output=True, text=True, timeout=30, env=subprocess_env())
    assert out.returncode == 0, out.stderr
    found = {n["name"]: n for n in json.loads(out.stdout) if n["node_id"] == node_id}
    assert set(found) == {node_id, f"{node_id}-2"}, found
    by_model = {n["models"][0]: n for n in found.values()}
    assert netns.addr_a in by_model["on-a"]["addresses"]
    assert netns.addr_b in by_model["on-b"]["addresses"]
    first.send("stop")
    second.send("stop")

