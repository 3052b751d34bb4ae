"""One completion rule: every job that ends sends exactly one `final: true` result, before its terminal status, saying
how many chunks preceded it and whether the output is complete (paging with `job.result`: tests/infer/)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.agent_proc import Recorder, controller


def finals(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in results if r.get("final")]


def assert_one_final(rec: Recorder, node: str, job_id: str, state: str, complete: bool, chunks: int = 0) -> dict:
    """On the node's own topics: exactly one final result, sent before the terminal status."""
    prefix = f"cvw/v1/nodes/{node}/jobs/{job_id}/"
    rec.wait_for(lambda m: any(t == prefix + "status" and isinstance(p, dict) and p["state"] == state
                               for t, p, _, _ in m))
    order = [(t.rsplit("/", 1)[1], p) for t, p, _, _ in rec.messages if t.startswith(prefix) and isinstance(p, dict)]
    fin = [i for i, (kind, p) in enumerate(order) if kind == "result" and p["final"]]
    assert len(fin) == 1, order
    terminal = next(i for i, (kind, p) in enumerate(order) if kind == "status" and p["state"] == state)
    assert fin[0] < terminal, "the final result goes out before the terminal status"
    final = order[fin[0]][1]
    assert final["chunks"] == chunks and final["seq"] == chunks and final["complete"] is complete
    if state != "SUCCEEDED":
        assert final["state"] == state and final["error"]["code"]
    return final


@pytest.mark.parametrize("case", ["succeeded", "failed", "timed_out", "canceled_running", "canceled_queued",
                                  "rejected"])
def test_every_terminal_state_sends_one_final_result(agents, mosquitto, case):
    node = f"node-{case.replace('_', '-')}"
    agents(node, jobs={"workers": 1, "enable_debug_jobs": True})
    rec = Recorder(mosquitto, f"cvw/v1/nodes/{node}/jobs/#")
    with controller(mosquitto) as ctl:
        if case == "succeeded":
            jid = ctl.submit("node.info", node=node)
            ctl.wait(jid, timeout=20)
            final = assert_one_final(rec, node, jid, "SUCCEEDED", complete=True)
            assert final["info"]["node_id"] == node
        elif case == "failed":
            jid = ctl.submit("debug.sleep", {"seconds": 0.1, "steps": 1, "fail": True}, node=node)
            ctl.wait(jid, timeout=20)
            assert assert_one_final(rec, node, jid, "FAILED", complete=False)["error"]["code"] == "debug_failure"
        elif case == "timed_out":
            jid = ctl.submit("debug.sleep", {"seconds": 30, "steps": 30}, node=node, timeout_s=0.5)
            ctl.wait(jid, timeout=20)
            assert_one_final(rec, node, jid, "TIMED_OUT", complete=False)
        elif case in ("canceled_running", "canceled_queued"):
            blocker = ctl.submit("debug.sleep", {"seconds": 30, "steps": 300}, node=node)
            queued = ctl.submit("debug.sleep", {"seconds": 1, "steps": 1}, node=node)
            rec.wait_for(lambda m: any(t.endswith(f"{blocker}/status") and p["state"] == "IN_PROGRESS"
                                       for t, p, _, _ in m if isinstance(p, dict)))
            target = blocker if case == "canceled_running" else queued
            ctl.wait(ctl.submit("job.cancel", {"job_id": target}, node=node), timeout=20)
            ctl.wait(target, timeout=20)
            assert_one_final(rec, node, target, "CANCELED", complete=False)
            ctl.wait(ctl.submit("job.cancel", {"job_id": blocker if target == queued else queued}, node=node),
                     timeout=20)
        else:
            jid = ctl.submit("debug.sleep", {"seconds": "1"}, node=node)
            out = ctl.wait(jid, timeout=20)
            assert out.state == "REJECTED" and out.last["error"]["code"] == "invalid_params"
            assert assert_one_final(rec, node, jid, "REJECTED", complete=False)["error"]["code"] == "invalid_params"
    rec.close()


def test_a_job_interrupted_by_a_crash_ends_with_its_final_result(agents, mosquitto):
    agent = agents("node-int", jobs={"workers": 1})
    rec = Recorder(mosquitto, "cvw/v1/nodes/node-int/jobs/#")
    with controller(mosquitto) as ctl:
        jid = ctl.submit("debug.sleep", {"seconds": 30, "steps": 30, "resumable": False}, node="node-int")
        rec.wait_for(lambda m: any(t.endswith(f"{jid}/status") and p["state"] == "IN_PROGRESS"
                                   for t, p, _, _ in m if isinstance(p, dict)))
        agent.kill()
        agent.start()
        out = ctl.wait(jid, timeout=30)
    assert out.state == "FAILED" and out.last["error"]["code"] == "interrupted"
    assert assert_one_final(rec, "node-int", jid, "FAILED", complete=False)["error"]["code"] == "interrupted"
    rec.close()
