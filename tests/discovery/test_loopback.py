"""Advertise and browse over real multicast sockets on the loopback interface, in one process."""

from __future__ import annotations

import queue
import threading
import time

from agent.discovery import Advertiser, NameConflict, NodeEvent, NodeInfo, browse, find_build_peers, find_nodes
from tests.discovery.conftest import LO, wait_for


class Events:
    """Consume a browse() generator on a thread so that waits can time out even when nothing arrives."""

    def __init__(self, timeout: float = 30):
        self.queue: queue.Queue[NodeEvent] = queue.Queue()
        self._gen = browse(timeout=timeout, interfaces=LO)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for ev in self._gen:
            self.queue.put(ev)

    def next(self, name: str, kind: str, timeout: float) -> NodeEvent:
        """The next event of ``kind`` for ``name``, skipping other nodes' events."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                ev = self.queue.get(timeout=left)
            except queue.Empty:
                break
            if ev.name == name and ev.kind == kind:
                return ev
        raise AssertionError(f"no {kind} event for {name} within {timeout}s")


def test_advertise_browse_update_and_remove(node_id: str) -> None:
    events = Events(timeout=20)
    adv = Advertiser(node_id, interfaces=LO, version="9.8.7", role="edge", mqtt="127.0.0.1:1883",
                     prefix="cvw/v1", accel=["cpu"], models=["blazeface"], caps=["detect"])
    try:
        t0 = time.monotonic()
        adv.start()
        # start() must not wait for the ~1.7 s of probing (the agent connects to MQTT meanwhile): when it returns,
        # probing is still under way. (A stopwatch on start() would fail whenever the machine is busy.)
        assert adv.state == "probing"

        added = events.next(node_id, "added", timeout=10)
        registered_after = time.monotonic() - t0
        assert adv.state == "registered" and adv.name == node_id
        assert registered_after > 0.5, "registration skipped probing?"
        node = added.node
        assert isinstance(node, NodeInfo)
        assert node.node_id == node_id and node.version == "9.8.7" and node.role == "edge" and node.proto == "1"
        assert node.addresses == ["127.0.0.1"] and node.mqtt == "127.0.0.1:1883" and node.prefix == "cvw/v1"
        assert node.accel == ["cpu"] and node.models == ["blazeface"] and node.caps == ["detect"]

        # TXT changes in place: same instance name, an 'updated' event, no re-registration.
        adv.update(models=["blazeface", "ppocr-det"], accel=["cpu", "openvino-gpu"]).result(5)
        updated = events.next(node_id, "updated", timeout=10)
        assert updated.node.models == ["blazeface", "ppocr-det"]
        assert updated.node.accel == ["cpu", "openvino-gpu"]
        assert adv.name == node_id

        # A clean stop sends goodbyes: browsers see the node go at once, not after the 75 min PTR TTL.
        adv.stop()
        removed = events.next(node_id, "removed", timeout=20)
        assert removed.node.node_id == node_id
        assert adv.state == "stopped"
    finally:
        adv.stop()


def test_browse_timeout_ends_iteration() -> None:
    t0 = time.monotonic()
    list(browse(timeout=0.5, interfaces=LO))
    assert time.monotonic() - t0 < 2


def test_same_node_id_conflict_is_resolved_and_reported(node_id: str) -> None:
    reports: list[tuple[str, NameConflict]] = []
    lock = threading.Lock()

    def reporter(tag: str):
        def cb(c: NameConflict) -> None:
            with lock:
                reports.append((tag, c))
        return cb

    first = Advertiser(node_id, interfaces=LO, models=["first-model"], on_conflict=reporter("first"))
    second = Advertiser(node_id, interfaces=LO, models=["second-model"], on_conflict=reporter("second"))
    try:
        first.start()
        assert first.wait_registered(10) and first.name == node_id
        second.start()
        assert second.wait_registered(10)
        # Probing may catch it, or both get the name and the tie-break settles it a moment later.
        names = wait_for(lambda: {first.name, second.name} == {node_id, f"{node_id}-2"} and
                         first.state == second.state == "registered", timeout=10)
        assert names, f"names did not settle: {first.name!r}, {second.name!r}"
        renamed = first if first.name != node_id else second
        kept = second if renamed is first else first
        assert renamed.conflicts and renamed.conflicts[-1].renamed
        assert renamed.conflicts[-1].final == f"{node_id}-2" and renamed.conflicts[-1].requested == node_id
        tag = "first" if renamed is first else "second"
        # on_conflict runs on the advertiser's thread just after the record is appended: wait for it.
        assert wait_for(lambda: any(t == tag and c.renamed for t, c in reports), timeout=5), reports

        # A browser that starts now finds both, each name carrying its own node's TXT.
        time.sleep(2.0)  # let the loser's goodbyes for the contested name expire from caches
        found = {n.name: n for n in find_nodes(3, interfaces=LO) if n.node_id == node_id}
        assert set(found) == {node_id, f"{node_id}-2"}, found
        assert found[kept.name].models == kept.txt["models"].split(",")
        assert found[renamed.name].models == renamed.txt["models"].split(",")
    finally:
        first.stop()
        second.stop()


def test_build_peers_are_found_by_role(node_id: str) -> None:
    build = Advertiser(f"{node_id}-trainer", interfaces=LO, role="build", caps=["train"])
    edge = Advertiser(f"{node_id}-cam", interfaces=LO, role="edge")
    try:
        build.start()
        edge.start()
        assert build.wait_registered(10) and edge.wait_registered(10)
        peers = [p for p in find_build_peers(2.5, interfaces=LO) if p.node_id.startswith(node_id)]
        assert [p.node_id for p in peers] == [f"{node_id}-trainer"]
        assert peers[0].caps == ["train"] and peers[0].addresses == ["127.0.0.1"]
        # And a node does not find itself.
        assert not [p for p in find_build_peers(1.0, interfaces=LO, exclude_node_id=f"{node_id}-trainer")
                    if p.node_id.startswith(node_id)]
    finally:
        build.stop()
        edge.stop()


def test_update_during_probing_is_not_lost(node_id: str) -> None:
    adv = Advertiser(node_id, interfaces=LO, models=["old"])
    try:
        adv.start()
        assert adv.state == "probing"
        fut = adv.update(models=["new-1", "new-2"])  # arrives while the name is still being probed
        assert fut is not None
        assert adv.wait_registered(10)
        assert wait_for(lambda: [n for n in find_nodes(1.5, interfaces=LO)
                                 if n.node_id == node_id and n.models == ["new-1", "new-2"]], timeout=8)
    finally:
        adv.stop()
