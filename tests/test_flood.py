"""A flood of large requests does not grow the state or the agent: 40 `infer` requests of 7 MB inline images.

Before, every job kept its params in the state file, which was rewritten whole on each commit: the state reached
280 MB, the agent 1.0 GB and `node.info` took 1.2-1.6 s. Now params of 64 KiB and more wait in spool files until
their job ends, a commit appends only what changed, and a finished job keeps a summary of at most
`jobs.finished_params_max_bytes` (docs/storage.md gives the bound). How long `node.info` takes during such a flood
is measured by bench/bench_jobs.py, not asserted here.
"""

from __future__ import annotations

import base64
import json
import os
import time

from agent.journal import SNAPSHOT, Journal
from agent.state import StateStore
from tests.agent_proc import controller

FLOOD = 40
RAW_BYTES = 5_250_000  # 7.0 MB once base64-encoded


def state_bytes(state_dir) -> int:
    snap = state_dir / SNAPSHOT
    return (snap.stat().st_size if snap.exists() else 0) + sum(s.path.stat().st_size
                                                               for s in Journal(state_dir).segments())


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_flood_of_large_requests_stays_out_of_the_state(agents, broker):
    # A broker without autosave_on_changes: saving its store of 280 MB of messages on every change stalls it.
    agent = agents("node-f", broker=broker, jobs={"workers": 1})
    data = base64.b64encode(os.urandom(RAW_BYTES)).decode()
    assert 6.9e6 < len(data) < 7.2e6
    with controller(broker) as ctl:
        # One worker busy, so the flood waits in the queue with its params.
        blocker = ctl.submit("debug.sleep", {"seconds": 300, "steps": 300}, node="node-f")
        ids = [ctl.submit("infer", {"model": "blazeface", "images": [{"id": f"big{i}", "data": data}]},
                          node="node-f", job_id=f"flood-{i}") for i in range(FLOOD)]
        deadline = time.monotonic() + 60
        while sum(1 for j in agent.jobs().values() if j["state"] == "QUEUED") < FLOOD:
            assert time.monotonic() < deadline, "the flood was not queued"
            time.sleep(0.1)
        queued_state = state_bytes(agent.state_dir)
        spool = sorted(p.name for p in (agent.state_dir / "spool").iterdir())
        rss = rss_mb(agent.proc.pid)
        t0 = time.monotonic()
        info = ctl.wait(ctl.submit("node.info", node="node-f"), timeout=30)
        print(f"\n{FLOOD} x 7 MB queued: state {queued_state / 1024:.0f} KiB, spool {len(spool)} files, agent RSS "
              f"{rss:.0f} MB, node.info {1000 * (time.monotonic() - t0):.0f} ms")
        assert info.state == "SUCCEEDED"
        assert info.final["info"]["jobs"]["by_state"]["QUEUED"] == FLOOD
        # 280 MB of requests: the journal holds their documents (about 1 KiB each), not their images.
        assert queued_state < 256 * 1024, f"state is {queued_state} bytes"
        assert spool == sorted(f"flood-{i}.json" for i in range(FLOOD))
        # An idle agent takes about 130 MB; 280 MB more would mean the requests are still held somewhere.
        assert rss < 250, f"agent RSS {rss:.0f} MB holding {FLOOD} queued 7 MB requests"

        ctl.wait(ctl.submit("job.cancel", {"job_id": blocker}, node="node-f"), timeout=20)
        for j in ids:
            out = ctl.wait(j, timeout=120)
            assert out.state == "FAILED" and out.last["error"]["code"] == "model_not_found"
    agent.stop()
    assert not list((agent.state_dir / "spool").iterdir()), "finished jobs' spool files were deleted"
    store = StateStore(agent.state_dir, read_only=True)
    for j in ids:
        summary = store.get_params(j)
        assert len(json.dumps(summary)) <= 4096
        assert summary["images"][0]["data"] == {"omitted": "string", "chars": len(data)}
    assert state_bytes(agent.state_dir) < 512 * 1024
