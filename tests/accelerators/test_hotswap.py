"""Loaded models: prediction pipeline, hot-swap with in-flight requests, failed loads roll back."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from models.runtime import ModelLoadError, ModelManager
from models.store import ModelStore
from tests.accelerators.conftest import ASTRONAUT_FACE, box_close
from tests.accelerators.helpers import catalog_package, ir_package, sha, write_manifest


@pytest.fixture
def manager(tmp_path: Path) -> ModelManager:
    return ModelManager(ModelStore(tmp_path / "store"))


def faces_v1(tmp_path: Path, path: Path) -> Path:
    return catalog_package(tmp_path / "v1", "blazeface", path, name="faces", version="1.0")


def faces_v2(tmp_path: Path, path: Path) -> Path:
    return catalog_package(tmp_path / "v2", "blazeface-full", path, name="faces", version="2.0")


def test_predict_end_to_end(manager: ModelManager, astronaut: np.ndarray) -> None:
    manager.deploy("blazeface")
    p = manager.predict("blazeface", astronaut)
    assert (p.model, p.version, p.backend, p.device) == ("blazeface", "0.6.0", "litert", "CPU")
    assert len(p.detections) == 1 and box_close(p.detections[0].box, ASTRONAUT_FACE, 2.0)
    assert p.image_size == (512, 512) and p.timing_ms["infer"] > 0
    # The same model forced onto the other backends gives the same face.
    for backend in ("openvino", "opencv"):
        pl = manager.open("blazeface", backend=backend)
        d = pl.run(astronaut).detections
        assert len(d) == 1 and box_close(d[0].box, p.detections[0].box, 0.5)
        pl.close()


def test_hot_swap_keeps_in_flight_requests(manager: ModelManager, tmp_path: Path, astronaut: np.ndarray,
                                           blazeface_path: Path, blazeface_full_path: Path) -> None:
    manager.deploy(str(faces_v1(tmp_path, blazeface_path)))
    manager.load("faces")
    assert manager.loaded() == {"faces": "1.0"}

    pinned = threading.Event()
    release = threading.Event()
    seen: dict = {}

    def long_request() -> None:
        with manager.acquire("faces") as p:  # a request that started before the swap
            pinned.set()
            release.wait(10)
            seen["version"] = p.version
            seen["result"] = p.run(astronaut)  # must still work after the swap
            seen["closed_during"] = p.closed

    t = threading.Thread(target=long_request)
    t.start()
    assert pinned.wait(5)
    res = manager.deploy(str(faces_v2(tmp_path, blazeface_full_path)))
    assert res["hot_swapped"] and res["version"] == "2.0" and res["previous"] == "1.0"
    # New requests go to v2 while the old request still holds v1.
    assert manager.predict("faces", astronaut).version == "2.0"
    release.set()
    t.join(10)
    assert seen["version"] == "1.0" and not seen["closed_during"]
    assert len(seen["result"].detections) == 1
    assert manager.store.active_version("faces") == "2.0"


def test_old_version_closed_after_last_request(manager: ModelManager, tmp_path: Path, blazeface_path: Path) -> None:
    manager.deploy(str(faces_v1(tmp_path, blazeface_path)))
    old = manager.load("faces")
    with manager.acquire("faces"):
        manager.swap("faces", "1.0")  # reload of the same version: still a new pipeline
        assert not old.closed
    assert old.closed


def test_failed_load_rolls_back(manager: ModelManager, tmp_path: Path, astronaut: np.ndarray,
                                blazeface_path: Path) -> None:
    manager.deploy(str(faces_v1(tmp_path, blazeface_path)))
    manager.load("faces")
    bad = catalog_package(tmp_path / "v3", "blazeface", blazeface_path, name="faces", version="3.0")
    f = bad / blazeface_path.name
    f.write_bytes(b"TFL3 this is not a flatbuffer" * 10)  # a broken model with a correct sha256
    m = (bad / "model.json").read_text().replace(
        '"sha256": "3bc182eb9f33925d9e58b5c8d59308a760f4adea8f282370e428c51212c26633"', f'"sha256": "{sha(f)}"'
    ).replace('"size": 229032', f'"size": {f.stat().st_size}')
    (bad / "model.json").write_text(m)
    with pytest.raises(ModelLoadError, match="failed to load"):
        manager.deploy(str(bad))
    assert manager.loaded() == {"faces": "1.0"}
    assert manager.store.active_version("faces") == "1.0"
    assert manager.store.versions("faces") == ["1.0"]  # the broken version was discarded
    assert manager.predict("faces", astronaut).version == "1.0"


def test_failed_smoke_inference_rolls_back(manager: ModelManager, tmp_path: Path) -> None:
    dec = {"type": "yolo", "version": "v8"}
    good = np.zeros((1, 6, 10), np.float32)
    manager.deploy(str(ir_package(tmp_path / "g", "tiny", "1", good, dec)))
    manager.load("tiny")
    nan = good.copy()
    nan[0, 0, 0] = np.nan  # a model that produces NaN (e.g. a bad conversion)
    with pytest.raises(ModelLoadError, match="not finite"):
        manager.deploy(str(ir_package(tmp_path / "b", "tiny", "2", nan, dec)))
    assert manager.loaded() == {"tiny": "1"} and manager.store.versions("tiny") == ["1"]
    # Without a smoke test the same package would have been activated.
    res = manager.deploy(str(ir_package(tmp_path / "b2", "tiny", "2", nan, dec)), smoke=False)
    assert res["version"] == "2"


def test_no_backend_can_run_it(manager: ModelManager, tmp_path: Path, blazeface_path: Path) -> None:
    pkg = catalog_package(tmp_path / "e", "blazeface", blazeface_path, name="tpu-only", version="1")
    import json

    m = json.loads((pkg / "model.json").read_text())
    m["files"] = {"edgetpu": m["files"]["tflite"]}
    m["preferred_backends"] = ["litert:EDGETPU"]
    write_manifest(pkg, m)
    with pytest.raises(ModelLoadError, match="no backend on this node can run tpu-only") as e:
        manager.deploy(str(pkg))
    assert e.value.selection is not None and e.value.selection.chosen is None
    assert manager.store.list() == []


def test_concurrent_predictions_during_swaps(manager: ModelManager, tmp_path: Path, astronaut: np.ndarray,
                                             blazeface_path: Path) -> None:
    manager.deploy(str(faces_v1(tmp_path, blazeface_path)))
    manager.load("faces")
    errors: list[BaseException] = []
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            try:
                assert len(manager.predict("faces", astronaut).detections) == 1
            except BaseException as e:  # collect, the main thread asserts
                errors.append(e)
                return

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for _ in range(4):
        manager.swap("faces", "1.0")
    stop.set()
    for t in threads:
        t.join(10)
    assert errors == []
