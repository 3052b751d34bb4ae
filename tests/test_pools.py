"""Pools: nodes sharing `$share/{pool}/...` — the broker balances, each job runs exactly once."""

from __future__ import annotations

from collections import Counter

from tests.agent_proc import Recorder, controller


def test_pool_jobs_run_exactly_once_across_two_nodes(agents, mosquitto):
    a = agents("pool-a", pools=["p1"])
    b = agents("pool-b", pools=["p1"])
    rec = Recorder(mosquitto, "cvw/v1/nodes/+/jobs/+/status")
    n = 20
    with controller(mosquitto) as ctl:
        ids = [ctl.submit("debug.sleep", {"seconds": 0.2, "steps": 1}, pool="p1") for _ in range(n)]
        outcomes = [ctl.wait(j, timeout=60) for j in ids]
    assert all(o.state == "SUCCEEDED" for o in outcomes)
    rec.wait_for(lambda m: sum(1 for _, p, _, _ in m if p["state"] == "SUCCEEDED") >= n)
    rec.close()
    # Status goes to the node's own topics: exactly one node ran each job, exactly once.
    started = Counter((p["job_id"], p["node_id"]) for _, p, _, _ in rec.messages
                      if p["state"] == "IN_PROGRESS" and p.get("progress") is None)
    assert sorted(j for j, _ in started) == sorted(ids)
    per_node = Counter(node for _, node in started)
    assert set(per_node) == {"pool-a", "pool-b"}, f"the broker balanced across both nodes: {per_node}"
    # The two nodes' local states agree: no job id in both.
    assert not set(a.jobs()) & set(b.jobs())
    assert {o.last["node_id"] for o in outcomes} == {"pool-a", "pool-b"}


def test_node_outside_pool_gets_nothing(agents, mosquitto):
    a = agents("pool-in", pools=["p2"])
    other = agents("pool-out", pools=[])
    with controller(mosquitto) as ctl:
        ids = [ctl.submit("node.info", pool="p2") for _ in range(5)]
        assert all(ctl.wait(j, timeout=30).state == "SUCCEEDED" for j in ids)
    assert set(a.jobs()) == set(ids)
    assert not other.jobs()
