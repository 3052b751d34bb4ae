#!/usr/bin/env python3
"""`make demo`: a cv-worker node end to end on this machine.

Starts a private mosquitto on a free loopback port (unless CV_WORKER_MQTT__HOST names a broker), starts the agent,
then plays fleet controller with `cv-worker submit`: asks the node about itself, deploys the BlazeFace face
detector from the offline catalog (download progress, sha256 check, smoke inference, hot swap), runs a real
batch of the scikit-image demo pictures through it (`infer` with `annotate`), prints a table of the detections
per image and writes the annotated images to demo-out/annotated/, asks the node's HTTP API for one prediction (as
`curl -F image=@... /v1/predict/blazeface?wait=true` would), and shows the node's jobs. Everything is stopped
cleanly at the end; the node's state stays in demo-out/ for a look.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.devbroker import Mosquitto  # noqa: E402

OUT = REPO / "demo-out"
CLI = [sys.executable, "-m", "agent.cli"]


def say(text: str) -> None:
    print(f"\n\033[1;36m==> {text}\033[0m", flush=True)


def run(*args: str, check: bool = True) -> int:
    print("$ cv-worker " + " ".join(args), flush=True)
    rc = subprocess.call([*CLI, *args, "--config", str(OUT / "config.toml")], cwd=REPO)
    if check and rc != 0:
        raise SystemExit(f"demo step failed (exit {rc}): cv-worker {' '.join(args)}")
    return rc


DEMO_PICTURES = ["astronaut", "chelsea", "coffee", "rocket", "camera", "page"]


def write_demo_images(folder: Path) -> None:
    """The scikit-image sample pictures as JPEG files in the node's input directory (plus a mirrored astronaut)."""
    import cv2
    from skimage import data

    folder.mkdir(parents=True)
    for name in DEMO_PICTURES:
        img = getattr(data, name)()
        bgr = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if img.ndim == 2 else img[:, :, ::-1]
        cv2.imwrite(str(folder / f"{name}.jpg"), bgr)
    cv2.imwrite(str(folder / "astronaut-mirrored.jpg"), data.astronaut()[:, ::-1, ::-1])


def run_batch() -> None:
    images = [{"id": p.stem, "path": p.name} for p in sorted((OUT / "images").glob("*.jpg"))]
    params = json.dumps({"model": "blazeface", "annotate": True, "images": images})
    print(f"$ cv-worker submit infer --node demo-node --params '<{len(images)} images, annotate>' --wait --json")
    proc = subprocess.run([*CLI, "submit", "infer", "--node", "demo-node", "--params", params, "--wait", "--json",
                           "--config", str(OUT / "config.toml")], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr)
        raise SystemExit(f"demo step failed (exit {proc.returncode}): cv-worker submit infer")
    results = json.loads(proc.stdout)["results"]
    annotated = OUT / "annotated"
    annotated.mkdir()
    print(f"\n{'image':22} {'size':>9}  {'faces':>5}  detections (label score x1,y1,x2,y2)")
    for chunk in results:
        for item in chunk.get("items", []):
            if not item["ok"]:
                print(f"{item['id']:22} error {item['error']['code']}: {item['error']['message']}")
                continue
            dets = item.get("detections") or []
            shown = "; ".join(f"{d['label']} {d['score']:.2f} {','.join(str(round(v)) for v in d['box'])}"
                              for d in dets) or "-"
            print(f"{item['id']:22} {item['width']:>4}x{item['height']:<4}  {len(dets):>5}  {shown}")
            if item.get("annotated"):
                shutil.copyfile(item["annotated"], annotated / f"{item['id']}.jpg")
    final = results[-1]
    print(f"\n{final['succeeded']} images, {final['detections']} faces, {final['errors']} errors, on "
          f"{final['backend']}:{final['device']}, {final['images_per_s']} images/s")
    print(f"annotated images written to {annotated}/")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_predict(http_port: int) -> None:
    """The same node over its local HTTP API: one upload, the answer with the box (docs/http.md)."""
    import requests

    base = f"http://127.0.0.1:{http_port}"
    token = (OUT / "state" / "http-token").read_text().strip()
    image = OUT / "images" / "astronaut.jpg"
    print(f"$ curl -H 'Authorization: Bearer <token>' -F image=@{image.name} '{base}/v1/predict/blazeface?wait=true'")
    with open(image, "rb") as f:
        r = requests.post(f"{base}/v1/predict/blazeface", params={"wait": "true"}, files={"image": f},
                          headers={"Authorization": f"Bearer {token}"}, timeout=60)
    body = r.json()
    if r.status_code != 200:
        raise SystemExit(f"HTTP {r.status_code}: {body}")
    for d in body["image"]["detections"]:
        print(f"  {d['label']} {d['score']:.2f} at {', '.join(str(round(v)) for v in d['box'])} "
              f"(job {body['job_id']}, {body['backend']}:{body['device']})")
    print(f"web console (while the agent runs): {base}/ with the token in {OUT / 'state' / 'http-token'}")


def main() -> int:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir()
    broker = None
    host = os.environ.get("CV_WORKER_MQTT__HOST")
    port = int(os.environ.get("CV_WORKER_MQTT__PORT", "1883"))
    if not host:
        say("starting a private mosquitto broker (set CV_WORKER_MQTT__HOST to use your own)")
        broker = Mosquitto(Path(tempfile.mkdtemp(prefix="cvw-demo-broker-")), save_every_change=False).start()
        host, port = broker.host, broker.port
        print(f"mosquitto listening on {host}:{port}")
    http_port = free_port()
    (OUT / "config.toml").write_text(
        f'node_id = "demo-node"\nstate_dir = "{OUT / "state"}"\n\n[mqtt]\nhost = "{host}"\nport = {port}\n\n'
        f'[discovery]\nenabled = false\n\n[inference]\ninput_dirs = ["{OUT / "images"}"]\n'
        f'outputs_dir = "{OUT / "outputs"}"\n\n[http]\nbind = "127.0.0.1"\nport = {http_port}\n'
    )
    write_demo_images(OUT / "images")
    say("checking the configuration")
    run("config", "check")
    say("starting the agent (cv-worker run)")
    log = open(OUT / "agent.log", "wb")
    agent = subprocess.Popen([*CLI, "run", "--config", str(OUT / "config.toml")], cwd=REPO, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while b"connected to MQTT broker" not in (OUT / "agent.log").read_bytes():
            if agent.poll() is not None or time.monotonic() > deadline:
                print((OUT / "agent.log").read_text())
                raise SystemExit("the agent did not come up")
            time.sleep(0.1)
        print(f"agent running (pid {agent.pid}); its log: {OUT / 'agent.log'}")
        say("a controller asks the node about itself: node.info")
        run("submit", "node.info", "--node", "demo-node", "--wait")
        say("deploying the BlazeFace face detector from the offline catalog: model.deploy")
        run("submit", "model.deploy", "--node", "demo-node", "--param", "source=blazeface", "--wait")
        say("a batch of images through BlazeFace: infer, with the results drawn on copies (annotate)")
        run_batch()
        say("the same node over HTTP: one image through its local API")
        http_predict(http_port)
        say("what the node has now")
        run("models", "list")
        run("accelerators", check=False)
        run("jobs")
    finally:
        say("stopping the agent and the broker")
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(30)
        except subprocess.TimeoutExpired:
            agent.kill()
        log.close()
        if broker is not None:
            broker.close()
    print(f"\nagent exited with {agent.returncode}; state and log kept in {OUT}")
    print("last lines of the agent log:")
    print("\n".join((OUT / "agent.log").read_text().splitlines()[-6:]))
    return 0 if agent.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
