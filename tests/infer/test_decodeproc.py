"""Decode worker processes (inference.decode_mode): same results as the thread workers, and a worker that dies
mid-batch costs one image at most, never the batch or the agent."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

from tests.agent_proc import controller
from tests.infer.conftest import blazeface_on, items_of, make_agent, run_job, worker_pids


def decode_workers(agent_pid: int) -> list[int]:
    """The agent's decode worker processes (children of its multiprocessing forkserver)."""
    return worker_pids(agent_pid, "cvw-decode")


def test_processes_and_threads_give_the_same_results(tmp_path, broker, image_dir, pictures):
    images = [{"id": f"p{i}", "path": p} for i, p in enumerate(pictures)]
    images += [{"id": "text", "path": "notes.jpg"}, {"id": "big", "path": "huge.jpg"},
               {"id": "missing", "path": "nope.jpg"}, {"id": "out", "path": "escape.jpg"}]
    got = {}
    for mode in ("processes", "threads"):
        a = make_agent(tmp_path / mode, broker, image_dir, node_id=f"mode-{mode}", decode_mode=mode,
                       chunk_size=4).start()
        try:
            with controller(broker) as ctl:
                out = run_job(ctl, a.node_id, {"model": "blazeface", "images": images})
            assert out.state == "SUCCEEDED", out.last
            got[mode] = [{k: v for k, v in it.items() if k != "inference_ms"} for it in items_of(out.results)]
            if mode == "processes":
                assert decode_workers(a.proc.pid), "no decode worker process was started"
            else:
                assert not decode_workers(a.proc.pid)
        finally:
            a.stop()
    assert [i["id"] for i in got["processes"]] == [i["id"] for i in images]
    assert got["processes"] == got["threads"]
    errors = {i["id"]: i["error"]["code"] for i in got["processes"] if not i["ok"]}
    assert errors == {"text": "not_an_image", "big": "too_large", "missing": "not_found", "out": "path_not_allowed"}
    assert sum(len(i["detections"]) for i in got["processes"] if i["ok"]) > 0


def test_a_decode_worker_killed_mid_batch_costs_no_image(tmp_path, broker, image_dir, pictures):
    a = make_agent(tmp_path / "a", broker, image_dir, node_id="crash-node", decode_mode="processes",
                   chunk_size=5).start()
    n = 300
    images = [{"id": f"img-{i:04d}", "path": pictures[i % len(pictures)]} for i in range(n)]
    try:
        with controller(broker) as ctl:
            jid = ctl.submit("infer", {"model": "blazeface", "images": images}, node=a.node_id)
            deadline = time.monotonic() + 60
            while not items_of(ctl.outcome(jid).results) or not decode_workers(a.proc.pid):
                assert time.monotonic() < deadline, ctl.outcome(jid).statuses[-1:]
                time.sleep(0.01)
            killed = decode_workers(a.proc.pid)
            for pid in killed:
                os.kill(pid, signal.SIGKILL)
            out = ctl.wait(jid, timeout=120)
            assert out.state == "SUCCEEDED", out.last
            items = items_of(out.results)
            assert [i["id"] for i in items] == [im["id"] for im in images]  # every image once, in order
            # the image being decoded is retried on the replacement worker
            assert all(i["ok"] for i in items), [i for i in items if not i["ok"]][:3]
            a.wait_log("decode worker died")
            replaced = decode_workers(a.proc.pid)
            assert replaced and not set(replaced) & set(killed)
            again = run_job(ctl, a.node_id, {"model": "blazeface", "images": images[:20]})
            assert again.state == "SUCCEEDED" and again.results[-1]["succeeded"] == 20, again.last
        assert a.proc.poll() is None
    finally:
        a.stop()
    assert "Traceback" not in a.log()


class _Silent:
    """A TCP server that accepts connections and never answers: a download that hangs until its worker dies."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hang.jpg"

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("backend", ["litert", "opencv"])
def test_an_image_that_kills_its_worker_twice_is_reported_and_the_batch_goes_on(image_dir, pictures, backend):
    from agent.inference.config import InferenceConfig
    from agent.inference.decodeproc import DecodePool
    from agent.inference.params import ImageItem

    pipeline, _ = blazeface_on(backend)
    silent = _Silent()
    pool = DecodePool(InferenceConfig(input_dirs=[image_dir]), workers=1, crash_retries=1)
    try:
        items = [ImageItem(id=f"a{i}", path=p) for i, p in enumerate(pictures[:6])]
        items.append(ImageItem(id="hostile", url=silent.url))
        items += [ImageItem(id=f"b{i}", path=p) for i, p in enumerate(pictures[6:])]
        stream = pool.try_map(pipeline, items, depth=4)
        assert stream is not None
        assert pool.try_map(pipeline, items, depth=4) is None  # one job at a time: the next one uses threads
        reached = threading.Event()

        def killer() -> None:
            # The worker is on the hostile image once every image before it has come back: kill it there, then
            # kill its replacement, which was handed the same image again.
            reached.wait(30)
            first = pool.pids()[0]
            os.kill(first, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while pool.restarts < 1 or pool.pids()[0] == first:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.01)
            os.kill(pool.pids()[0], signal.SIGKILL)

        t = threading.Thread(target=killer, daemon=True)
        t.start()
        got = []
        for item, res in stream:
            got.append((item.id, res))
            if item.id == "a5":
                reached.set()
        t.join(5)
        assert pool.restarts == 2
        assert [i for i, _ in got] == [it.id for it in items]
        failed = {i: r for i, r in got if isinstance(r, BaseException)}
        assert list(failed) == ["hostile"] and failed["hostile"].code == "decode_crashed"
        assert all(r.tensor is not None for i, r in got if i != "hostile")
    finally:
        pool.close()
        silent.close()


def test_a_canceled_batch_hands_the_worker_processes_to_the_next_job(tmp_path, broker, image_dir, pictures):
    a = make_agent(tmp_path / "a", broker, image_dir, node_id="cancel-node", decode_mode="processes",
                   chunk_size=5).start()
    images = [{"id": f"img-{i:04d}", "path": pictures[i % len(pictures)]} for i in range(3000)]
    try:
        with controller(broker) as ctl:
            jid = ctl.submit("infer", {"model": "blazeface", "images": images}, node=a.node_id)
            deadline = time.monotonic() + 60
            while not items_of(ctl.outcome(jid).results):
                assert time.monotonic() < deadline, ctl.outcome(jid).statuses[-1:]
                time.sleep(0.01)
            workers = decode_workers(a.proc.pid)
            c = ctl.wait(ctl.submit("job.cancel", {"job_id": jid}, node=a.node_id), timeout=20)
            assert c.state == "SUCCEEDED", c.last
            assert ctl.wait(jid, timeout=30).state == "CANCELED"
            again = run_job(ctl, a.node_id, {"model": "blazeface", "images": images[:40]})
            assert again.state == "SUCCEEDED" and again.results[-1]["succeeded"] == 40, again.last
            assert [i["id"] for i in items_of(again.results)] == [im["id"] for im in images[:40]]
            assert decode_workers(a.proc.pid) == workers  # the same processes: drained, not replaced
        assert a.stop() == 0
    finally:
        a.stop()
    assert "Traceback" not in a.log() and "decode worker died" not in a.log()
