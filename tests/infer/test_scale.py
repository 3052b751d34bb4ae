"""Resume after SIGKILL mid-batch with every image reported exactly once; 1,000 images with flat memory."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.agent_proc import controller
from tests.infer.conftest import items_of, make_agent, write_jpeg


@pytest.fixture(scope="module")
def many(image_dir: Path) -> list[str]:
    """Twelve real pictures at different sizes (up to 1024 px), inside the agent's input directory."""
    import cv2
    from skimage import data

    out = []
    d = image_dir / "many"
    d.mkdir(exist_ok=True)
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        img = getattr(data, name)()
        for scale in (0.5, 1.0, 2.0):
            resized = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            out.append(str(write_jpeg(d / f"{name}-{scale}.jpg", resized).relative_to(image_dir)))
    return out


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_resume_after_sigkill_reports_every_image_once(tmp_path, broker, image_dir, many):
    agent = make_agent(tmp_path / "a", broker, image_dir, node_id="resume-node", chunk_size=5).start()
    n = 400
    images = [{"id": f"img-{i:04d}", "path": many[i % len(many)]} for i in range(n)]
    with controller(broker) as ctl:
        jid = ctl.submit("infer", {"model": "blazeface", "images": images}, node=agent.node_id)
        deadline = time.monotonic() + 60
        while len(ctl.outcome(jid).results) < 3:  # a few chunks are durable: kill in the middle of the batch
            assert time.monotonic() < deadline, ctl.outcome(jid).statuses[-1:]
            time.sleep(0.005)
        agent.kill()
        seen_before_kill = len(items_of(ctl.outcome(jid).results))
        assert 0 < seen_before_kill < n
        agent.start()
        out = ctl.wait(jid, timeout=90)
    assert out.state == "SUCCEEDED", out.last
    assert any(s["details"].get("resumed") for s in out.statuses), "the job was not resumed from a checkpoint"
    ids = [i["id"] for i in items_of(out.results)]
    dup = [k for k, c in Counter(ids).items() if c > 1]
    assert not dup and sorted(ids) == [im["id"] for im in images]
    assert ids == [im["id"] for im in images]  # and in order
    final = out.results[-1]
    assert final["total"] == n and final["succeeded"] == n and final["resumed_from"] > 0
    # the stored log (what `job ID --result` and job.result serve) agrees: each image once
    stored = json.loads(agent.cli("job", jid, "--result").stdout)
    assert [i["id"] for i in items_of(stored)] == ids
    agent.stop()


def test_thousand_images_flat_memory_and_bounded_progress(tmp_path, broker, image_dir, many):
    agent = make_agent(tmp_path / "m", broker, image_dir, node_id="mem-node", progress_interval_s=0.2).start()
    n = 1000
    images = [{"id": f"img-{i:04d}", "path": many[i % len(many)]} for i in range(n)]
    pid = agent.proc.pid
    samples: list[tuple[int, int]] = []  # (images reported so far, RSS KiB)
    with controller(broker) as ctl:
        # warm up: the model and the runtimes are loaded before the measurement starts
        assert ctl.wait(ctl.submit("infer", {"model": "blazeface", "images": images[:24]}, node=agent.node_id),
                        timeout=60).state == "SUCCEEDED"
        jid = ctl.submit("infer", {"model": "blazeface", "images": images}, node=agent.node_id)
        t0 = time.monotonic()
        while not ctl.outcome(jid).done and time.monotonic() - t0 < 120:
            samples.append((len(items_of(ctl.outcome(jid).results)), rss_kib(pid)))
            time.sleep(0.05)
        out = ctl.wait(jid, timeout=5)
        took = time.monotonic() - t0
    assert out.state == "SUCCEEDED" and out.results[-1]["succeeded"] == n
    early = [r for done, r in samples if 0 < done <= 200]
    late = [r for done, r in samples if done > 200]
    assert early and late, samples[:5]
    growth_mib = (max(late) - max(early)) / 1024
    print(f"RSS after 200 images {max(early) / 1024:.0f} MiB, peak {max(late) / 1024:.0f} MiB, "
          f"growth {growth_mib:.1f} MiB over {n} images")
    assert growth_mib < 24, f"memory grew by {growth_mib:.1f} MiB while processing {n} images"
    prog = [s["details"] for s in out.statuses if s["state"] == "IN_PROGRESS" and "processed" in s["details"]]
    assert len(prog) >= 2
    assert all({"processed", "total", "images_per_s", "eta_s"} <= set(p) for p in prog[1:])
    assert prog[-1]["total"] == n and prog[-1]["images_per_s"] > 0
    assert len(prog) <= took / 0.2 + 4, f"{len(prog)} progress updates in {took:.1f} s"
    agent.stop()
