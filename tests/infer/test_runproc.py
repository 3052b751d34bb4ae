"""The inference process (inference.runtime_mode): the same results as the agent's own runtime, started for the
next job in `auto`, and a runtime that dies mid-batch costs no image, the batch and the agent go on."""

from __future__ import annotations

import os
import signal
import time
from types import SimpleNamespace
from typing import Any

import pytest

from tests.agent_proc import controller
from tests.infer.conftest import blazeface_on, items_of, make_agent, run_job, worker_pids


def _items(out: Any) -> list[dict[str, Any]]:
    return [{k: v for k, v in it.items() if k != "inference_ms"} for it in items_of(out.results)]


@pytest.mark.parametrize("backend", ["litert", "opencv"])
def test_the_inference_process_gives_the_same_results_as_the_agents_runtime(tmp_path, broker, image_dir, pictures,
                                                                            backend):
    images = [{"id": f"p{i}", "path": p} for i, p in enumerate(pictures)]
    images += [{"id": "text", "path": "notes.jpg"}, {"id": "missing", "path": "nope.jpg"},
               {"id": "astronaut", "path": "astronaut.jpg"}]
    got = {}
    for mode in ("process", "thread"):
        a = make_agent(tmp_path / mode, broker, image_dir, node_id=f"rt-{mode}-{backend}", decode_mode="processes",
                       runtime_mode=mode, chunk_size=4)
        with open(a.config_path, "a") as f:  # only this backend may serve the model
            for other in ("litert", "openvino", "opencv"):
                if other != backend:
                    f.write(f"[accelerators.{other}]\nenabled = false\n")
        a.start()
        try:
            with controller(broker) as ctl:
                out = run_job(ctl, a.node_id, {"model": "blazeface", "images": images})
            assert out.state == "SUCCEEDED", out.last
            final = out.results[-1]
            assert final["backend"] == backend
            assert final["inference_process"] is (mode == "process")
            got[mode] = _items(out)
            assert bool(worker_pids(a.proc.pid, "cvw-infer")) is (mode == "process")
        finally:
            a.stop()
        if mode == "process":
            a.wait_log("inference process (pid")
    assert got["process"] == got["thread"]
    assert [i["id"] for i in got["process"]] == [i["id"] for i in images]
    errors = {i["id"]: i["error"]["code"] for i in got["process"] if not i["ok"]}
    assert errors == {"text": "not_an_image", "missing": "not_found"}
    face = next(i for i in got["process"] if i["id"] == "astronaut")["detections"][0]["box"]
    assert face == pytest.approx([178, 81, 272, 175], abs=6)


def test_auto_loads_the_process_during_a_large_job_and_uses_it_for_the_next(tmp_path, broker, image_dir, pictures):
    a = make_agent(tmp_path / "a", broker, image_dir, node_id="rt-auto", decode_mode="processes",
                   runtime_mode="auto").start()
    small = [{"id": f"s{i}", "path": pictures[i % len(pictures)]} for i in range(8)]
    large = [{"id": f"l{i}", "path": pictures[i % len(pictures)]} for i in range(40)]
    try:
        with controller(broker) as ctl:
            first = run_job(ctl, a.node_id, {"model": "blazeface", "images": small})
            assert first.results[-1]["inference_process"] is False
            assert not worker_pids(a.proc.pid, "cvw-infer"), "a small batch must not start a second model copy"
            second = run_job(ctl, a.node_id, {"model": "blazeface", "images": large})
            assert second.results[-1]["inference_process"] is False  # loading meanwhile: this job did not wait
            deadline = time.monotonic() + 10
            while len(worker_pids(a.proc.pid, "cvw-infer")) != 1:  # named once its interpreter has started
                assert time.monotonic() < deadline, "the large job started no inference process"
                time.sleep(0.05)
            deadline = time.monotonic() + 30
            while True:  # the next jobs use it as soon as it has loaded the model
                third = run_job(ctl, a.node_id, {"model": "blazeface", "images": small})
                assert third.state == "SUCCEEDED", third.last
                if third.results[-1]["inference_process"]:
                    break
                assert time.monotonic() < deadline, "the inference process never became ready"
                time.sleep(0.2)
            assert _items(third) == _items(first)
            a.wait_log("inference process (pid")
    finally:
        a.stop()
    assert "Traceback" not in a.log()


def test_an_inference_process_killed_mid_batch_costs_no_image(tmp_path, broker, image_dir, pictures):
    a = make_agent(tmp_path / "a", broker, image_dir, node_id="rt-crash", decode_mode="processes",
                   runtime_mode="process", chunk_size=5).start()
    n = 400
    images = [{"id": f"img-{i:04d}", "path": pictures[i % len(pictures)]} for i in range(n)]
    try:
        with controller(broker) as ctl:
            jid = ctl.submit("infer", {"model": "blazeface", "images": images}, node=a.node_id)
            deadline = time.monotonic() + 60
            while not items_of(ctl.outcome(jid).results):
                assert time.monotonic() < deadline, ctl.outcome(jid).statuses[-1:]
                time.sleep(0.01)
            killed = worker_pids(a.proc.pid, "cvw-infer")
            assert killed
            os.kill(killed[0], signal.SIGKILL)
            out = ctl.wait(jid, timeout=120)
            assert out.state == "SUCCEEDED", out.last
            items = items_of(out.results)
            assert [i["id"] for i in items] == [im["id"] for im in images]  # every image once, in order
            assert all(i["ok"] for i in items), [i for i in items if not i["ok"]][:3]  # the lost ones retried
            a.wait_log("inference process died")
            replaced = worker_pids(a.proc.pid, "cvw-infer")
            assert replaced and replaced != killed
            again = run_job(ctl, a.node_id, {"model": "blazeface", "images": images[:20]})
            assert again.state == "SUCCEEDED" and again.results[-1]["succeeded"] == 20, again.last
            assert again.results[-1]["inference_process"] is True
        assert a.proc.poll() is None
    finally:
        a.stop()
    assert "Traceback" not in a.log()


def test_an_image_the_inference_process_dies_on_is_reported_and_the_batch_goes_on(image_dir, pictures):
    """The pool on its own, one slot deep, no retry: the process is stopped, then killed while it holds exactly
    one image (every image before it has come back); that image is reported `inference_crashed`, a new process
    takes the rest."""
    import threading

    from agent.inference.config import InferenceConfig
    from agent.inference.decodeproc import DecodePool
    from agent.inference.params import ImageItem

    pipeline, key = blazeface_on("litert")
    pool = DecodePool(InferenceConfig(input_dirs=[image_dir]), workers=1, crash_retries=0)
    try:
        items = [ImageItem(id=f"i{i}", path=p) for i, p in enumerate(pictures)]
        lease = pool.try_stream(pipeline, items, depth=1, runtime=key, wait=True)
        assert lease is not None and lease.inferred
        stream = iter(lease)
        got = [next(stream) for _ in range(5)]
        pid = pool.runtime_pid()
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # it cannot read the next image: it dies holding it
        killer = threading.Timer(0.5, os.kill, (pid, signal.SIGKILL))
        killer.start()
        got += list(stream)
        killer.join()
        assert [g[0].id for g in got] == [it.id for it in items]
        failed = [(g[0].id, g[1]) for g in got if isinstance(g[1], BaseException)]
        assert [f for f, _ in failed] == ["i5"] and failed[0][1].code == "inference_crashed"
        assert "exit code -9" in failed[0][1].message
        assert pool.runtime_restarts == 1 and pool.runtime_pid() not in (None, pid)
        ok = [g for g in got if not isinstance(g[1], BaseException)]
        assert len(ok) == len(items) - 1
        assert all(not isinstance(g[2], BaseException) and g[2].outputs for g in ok)
    finally:
        pool.close()


def test_runtime_key_keeps_accelerator_devices_in_the_agent():
    from agent.inference.batch import runtime_key
    from agent.inference.runproc import RuntimeKey

    class _Backends(dict):  # type: ignore[type-arg]
        pass

    node: Any = SimpleNamespace(model_manager=SimpleNamespace(backends={
        "litert": SimpleNamespace(config="litert-config"), "openvino": SimpleNamespace(config="ov-config")}))

    def pipeline(backend: str, device: str) -> Any:
        return SimpleNamespace(model=SimpleNamespace(backend=backend, device=device, path="/m/model.tflite"))

    assert runtime_key(node, pipeline("litert", "CPU")) == RuntimeKey("litert", "CPU", "/m/model.tflite",
                                                                      "litert-config")
    for backend, device in (("litert", "EdgeTPU"), ("openvino", "MYRIAD"), ("openvino", "GPU"), ("gone", "CPU")):
        assert runtime_key(node, pipeline(backend, device)) is None, (backend, device)


def test_the_slower_stage_gets_the_cpu_first_and_priorities_come_back(image_dir, pictures):
    from agent.inference.config import InferenceConfig
    from agent.inference.decodeproc import YIELD_NICE, DecodePool
    from agent.inference.params import ImageItem

    pipeline, key = blazeface_on("opencv")
    model = pipeline.model
    pool = DecodePool(InferenceConfig(input_dirs=[image_dir]), workers=1)
    base = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        items = [ImageItem(id=f"i{i}", path=p) for i, p in enumerate(pictures * 3)]  # 45: past the 32-image sample
        lease = pool.try_stream(pipeline, items, depth=4, runtime=key, wait=True)
        assert lease is not None and lease.inferred
        got = list(lease)
        assert len(got) == len(items)
        # the first result comes pickled and shapes the output ring; the others come through it
        assert pool.results_in_shm >= len(items) - 5
        decode_pid, runtime_pid = pool.pids()[0], pool.runtime_pid()
        assert runtime_pid is not None
        # which stage was slower depends on the machine; the other one was made to yield
        nices = {os.getpriority(os.PRIO_PROCESS, decode_pid), os.getpriority(os.PRIO_PROCESS, runtime_pid)}
        assert nices == {base, min(19, base + YIELD_NICE)}
        for slower, decode_nice, runtime_nice in (("infer", base + YIELD_NICE, base),
                                                  ("decode", base, base + YIELD_NICE), (None, base, base)):
            pool.prioritise(slower)
            assert os.getpriority(os.PRIO_PROCESS, decode_pid) == min(19, decode_nice), slower
            assert os.getpriority(os.PRIO_PROCESS, runtime_pid) == min(19, runtime_nice), slower
        # results read from the output ring equal what the agent's own copy of the model gives for the same image
        again = pool.try_map(pipeline, items[-3:], depth=4)
        assert again is not None
        for (item, prep), (_, _, res) in zip(again, got[-3:]):
            mine = model.infer(model.stage(prep.tensor))
            assert mine.outputs.keys() == res.outputs.keys()
            assert all((mine.outputs[k] == res.outputs[k]).all() for k in mine.outputs), item.id
    finally:
        pool.close()
