"""Fixtures for the accelerator and model-store tests: real models from the wheels, real runtimes.

Fakes exist only at the hardware boundary: a compiled stand-in for libedgetpu.so.1 (same C plugin ABI) and a
2022.3-style OpenVINO runtime whose MYRIAD device is simulated on top of the real CPU plugin.
"""

from __future__ import annotations

import http.server
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent

# Expected single face of BlazeFace short range on skimage.data.astronaut() (see ../shared/ASSETS.md).
ASTRONAUT_FACE = (178.0, 81.0, 272.0, 175.0)
ASTRONAUT_SCORE = 0.92


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="session")
def page() -> np.ndarray:
    from skimage import data

    return data.page()


@pytest.fixture(scope="session")
def blazeface_path() -> Path:
    from models.catalog import locate

    return locate("blazeface")


@pytest.fixture(scope="session")
def blazeface_full_path() -> Path:
    from models.catalog import locate

    return locate("blazeface-full")


@pytest.fixture(scope="session")
def ppocr_path() -> Path:
    from models.catalog import locate

    return locate("ppocr-det")


@pytest.fixture(scope="session")
def fake_edgetpu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the libedgetpu stand-in with the system C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        # `make test` installs gcc; a missing compiler is a missing install step, not absent hardware.
        pytest.fail("no C compiler to build the EdgeTPU stand-in library: apt-get install gcc (make test does)")
    out = tmp_path_factory.mktemp("edgetpu") / "libedgetpu.so.1"
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(out), str(HERE / "fake_edgetpu.c")], check=True)
    return out


@pytest.fixture
def edgetpu_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Log file of the options the stand-in library received; no TPU plugged in until a test sets devices."""
    log = tmp_path / "edgetpu-options.log"
    monkeypatch.setenv("FAKE_EDGETPU_LOG", str(log))
    monkeypatch.setenv("FAKE_EDGETPU_DEVICES", "")
    return log


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A real http.server on 127.0.0.1 serving a temporary directory; yields (directory, base URL)."""
    root = tmp_path / "www"
    root.mkdir()

    def handler(*a: object, **kw: object) -> _Handler:
        return _Handler(*a, directory=str(root), **kw)  # type: ignore[arg-type]

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield root, f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def make_tar(src_dir: Path, out: Path, top: str | None = None) -> Path:
    with tarfile.open(out, "w:gz") as tf:
        tf.add(src_dir, arcname=top or ".")
    return out


def box_close(a: tuple[float, ...], b: tuple[float, ...], tol: float) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))
