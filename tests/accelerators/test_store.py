"""Model store: install from dir/.tar.gz/URL/catalog, verification, atomicity, versions and path safety."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from models.config import ModelsConfig
from models.fsutil import UnsafePackage
from models.manifest import ManifestError, load_manifest
from models.store import ModelStore, StoreError
from tests.accelerators.conftest import make_tar
from tests.accelerators.helpers import catalog_package, sha


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


@pytest.fixture
def pkg(tmp_path: Path, blazeface_path: Path) -> Path:
    return catalog_package(tmp_path / "src" / "faces", "blazeface", blazeface_path, name="faces", version="1.0")


def store_state(store: ModelStore) -> list[str]:
    """Every path in the store except the lock and empty staging: what a failed install must not change."""
    out = []
    for dirpath, _dirnames, filenames in os.walk(store.root):
        rel = Path(dirpath).relative_to(store.root)
        if rel.parts[:1] == (".staging",):
            out.extend(str(rel / n) for n in filenames)  # leftovers in staging count as damage too
            continue
        out.extend(str(rel / n) for n in filenames if n != ".lock")
    return sorted(out)


def test_install_from_directory(store: ModelStore, pkg: Path) -> None:
    r = store.install(pkg)
    assert (r.name, r.version, r.activated, r.previous) == ("faces", "1.0", True, None)
    assert store.active_version("faces") == "1.0"
    store.verify("faces")
    [m] = store.list()
    assert (m.name, m.active, m.versions, m.task, m.formats) == ("faces", "1.0", ["1.0"], "detection", ["tflite"])
    assert store.manifest("faces").decoder.type == "blazeface"


def test_install_from_tar_gz_with_top_folder(store: ModelStore, pkg: Path, tmp_path: Path) -> None:
    archive = make_tar(pkg, tmp_path / "faces.tar.gz", top="faces-1.0")
    store.install(archive, sha256=sha(archive))
    assert store.active_version("faces") == "1.0"
    with pytest.raises(StoreError, match="sha256 of"):
        store.install(archive, sha256="0" * 64)


def test_install_from_http(store: ModelStore, pkg: Path, http_root: tuple[Path, str]) -> None:
    root, base = http_root
    make_tar(pkg, root / "faces.tar.gz")
    seen: list[tuple[str, int, int | None]] = []
    r = store.install(f"{base}/faces.tar.gz", progress=lambda *a: seen.append(a), sha256=sha(root / "faces.tar.gz"))
    assert r.version == "1.0"
    downloads = [s for s in seen if s[0] == "download"]
    size = (root / "faces.tar.gz").stat().st_size
    assert downloads and downloads[-1][1:] == (size, size)
    assert [d[1] for d in downloads] == sorted(d[1] for d in downloads)


def test_http_errors_and_limits(tmp_path: Path, pkg: Path, http_root: tuple[Path, str]) -> None:
    root, base = http_root
    make_tar(pkg, root / "faces.tar.gz")
    small = ModelStore(tmp_path / "small", ModelsConfig(max_download_bytes=4096))
    with pytest.raises(StoreError, match="over the 4096 byte limit") as e:
        small.install(f"{base}/faces.tar.gz")
    assert e.value.code == "too_large"
    with pytest.raises(StoreError, match="HTTP 404"):
        small.install(f"{base}/missing.tar.gz")
    with pytest.raises(StoreError, match="sha256"):
        ModelStore(tmp_path / "s2").install(f"{base}/faces.tar.gz", sha256="1" * 64)
    with pytest.raises(StoreError, match="failed"):
        small.install("http://127.0.0.1:9/none.tar.gz")
    assert store_state(small) == []


def test_streaming_limit_without_content_length(tmp_path: Path, pkg: Path) -> None:
    """A server that sends no Content-Length is cut off once the limit is crossed."""
    import http.server
    import threading

    data = (make_tar(pkg, tmp_path / "f.tar.gz")).read_bytes()

    class Chunked(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()  # no Content-Length: the body ends when the connection closes
            self.wfile.write(data)

        def log_message(self, *a: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Chunked)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        s = ModelStore(tmp_path / "s", ModelsConfig(max_download_bytes=len(data) // 2))
        with pytest.raises(StoreError, match="byte limit"):
            s.install(f"http://127.0.0.1:{srv.server_address[1]}/x.tar.gz")
        assert store_state(s) == []
        ModelStore(tmp_path / "s3").install(f"http://127.0.0.1:{srv.server_address[1]}/x.tar.gz")
    finally:
        srv.shutdown()
        srv.server_close()


def test_catalog_installs_offline(store: ModelStore) -> None:
    for name in ("blazeface", "blazeface-full", "ppocr-det"):
        store.install(name)
        store.verify(name)
    assert [m.name for m in store.list()] == ["blazeface", "blazeface-full", "ppocr-det"]
    assert store.manifest("ppocr-det").files["onnx"].sha256.startswith("d2a7720d")


def test_checksum_mismatch_changes_nothing(store: ModelStore, pkg: Path) -> None:
    store.install(pkg)
    before = store_state(store)
    m = json.loads((pkg / "model.json").read_text())
    m["version"] = "2.0"
    m["files"]["tflite"]["sha256"] = "f" * 64
    (pkg / "model.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="does not match the manifest") as e:
        store.install(pkg)
    assert e.value.code == "checksum_mismatch"
    assert store_state(store) == before and store.active_version("faces") == "1.0"


def test_corrupted_file_detected_by_verify(store: ModelStore, pkg: Path) -> None:
    store.install(pkg)
    f = store.package_dir("faces") / "face_detection_short_range.tflite"
    data = bytearray(f.read_bytes())
    data[1000] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="sha256"):
        store.verify("faces")


def test_missing_file(store: ModelStore, pkg: Path) -> None:
    (pkg / "face_detection_short_range.tflite").unlink()
    with pytest.raises(StoreError, match="does not contain it"):
        store.install(pkg)


@pytest.mark.parametrize("bad", ["../escape.tflite", "/etc/passwd", "a/../../b.tflite", "..\\x.tflite"])
def test_manifest_paths_must_stay_inside(store: ModelStore, pkg: Path, bad: str) -> None:
    m = json.loads((pkg / "model.json").read_text())
    m["files"]["tflite"]["path"] = bad
    (pkg / "model.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="files.tflite.path"):
        store.install(pkg)
    assert store_state(store) == []


@pytest.mark.parametrize("name", ["../evil", "Faces", "a/b", "", ".hidden"])
def test_model_names_are_validated(store: ModelStore, pkg: Path, name: str) -> None:
    m = json.loads((pkg / "model.json").read_text())
    m["name"] = name
    (pkg / "model.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="name"):
        store.install(pkg)
    with pytest.raises(StoreError, match="invalid model name"):
        store.remove(name or "..")


def test_symlink_out_of_package_refused(store: ModelStore, pkg: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not a model")
    (pkg / "labels.txt").symlink_to(secret)
    with pytest.raises(UnsafePackage, match="symlink leading outside"):
        store.install(pkg)


def test_inner_symlink_is_copied_as_a_file(store: ModelStore, pkg: Path) -> None:
    (pkg / "alias.tflite").symlink_to("face_detection_short_range.tflite")
    r = store.install(pkg)
    assert not any(p.is_symlink() for p in Path(r.path).rglob("*"))


def _tar_with(tmp_path: Path, pkg: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    out = tmp_path / "evil.tar.gz"
    with tarfile.open(out, "w:gz") as tf:
        tf.add(pkg, arcname=".")
        tf.addfile(member, io.BytesIO(data) if data else None)
    return out


def test_tar_path_traversal_refused(store: ModelStore, pkg: Path, tmp_path: Path) -> None:
    m = tarfile.TarInfo("../../outside.txt")
    m.size = 3
    with pytest.raises(UnsafePackage, match="absolute or '..'"):
        store.install(_tar_with(tmp_path, pkg, m, b"bad"))
    assert not (tmp_path / "outside.txt").exists() and not (store.root.parent / "outside.txt").exists()
    assert store_state(store) == []


def test_tar_symlink_out_refused(store: ModelStore, pkg: Path, tmp_path: Path) -> None:
    m = tarfile.TarInfo("labels.txt")
    m.type = tarfile.SYMTYPE
    m.linkname = "/etc/passwd"
    with pytest.raises(UnsafePackage, match="symlink leading outside"):
        store.install(_tar_with(tmp_path, pkg, m))
    m2 = tarfile.TarInfo("dev")
    m2.type = tarfile.CHRTYPE
    with pytest.raises(UnsafePackage, match="special file"):
        store.install(_tar_with(tmp_path, pkg, m2))


def test_tar_bomb_bounded(tmp_path: Path, pkg: Path) -> None:
    archive = make_tar(pkg, tmp_path / "f.tar.gz")
    s = ModelStore(tmp_path / "s", ModelsConfig(max_unpacked_bytes=100_000))
    with pytest.raises(UnsafePackage, match="byte limit"):
        s.install(archive)


def test_not_an_archive(store: ModelStore, tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"this is not gzip")
    with pytest.raises(UnsafePackage, match="not a readable tar"):
        store.install(junk)
    with pytest.raises(StoreError, match="catalog model"):
        store.install("no-such-thing")


def test_versions_activate_prune_and_remove(tmp_path: Path, blazeface_path: Path) -> None:
    store = ModelStore(tmp_path / "s", ModelsConfig(keep_versions=2))
    for v in ("1.0", "1.9", "1.10"):
        store.install(catalog_package(tmp_path / v, "blazeface", blazeface_path, name="faces", version=v))
    # 1.10 sorts after 1.9; keep_versions=2 keeps the active one and the newest other one.
    assert store.versions("faces") == ["1.9", "1.10"] and store.active_version("faces") == "1.10"
    assert store.activate("faces", "1.9") == "1.10"
    with pytest.raises(StoreError, match="active version") as e:
        store.remove("faces", "1.9")
    assert e.value.code == "active_version"
    assert store.remove("faces", "1.10") == ["1.10"]
    assert store.remove("faces") == ["1.9"]
    assert store.list() == [] and not (store.root / "faces").exists()
    with pytest.raises(StoreError, match="not installed"):
        store.remove("faces")


def test_same_version_same_files_is_idempotent_different_files_conflict(
    store: ModelStore, pkg: Path, tmp_path: Path, blazeface_full_path: Path
) -> None:
    store.install(pkg)
    assert store.install(pkg).already_installed
    other = catalog_package(tmp_path / "other", "blazeface-full", blazeface_full_path, name="faces", version="1.0")
    with pytest.raises(StoreError, match="already installed with different files") as e:
        store.install(other)
    assert e.value.code == "version_conflict"


def test_interrupted_install_leaves_no_trace(store: ModelStore, pkg: Path, http_root: tuple[Path, str]) -> None:
    """A crash/cancel in the middle of a download: nothing visible, staging cleaned."""
    root, base = http_root
    make_tar(pkg, root / "faces.tar.gz")

    class Stop(Exception):
        pass

    def progress(phase: str, done: int, total: int | None) -> None:
        if phase == "download":
            raise Stop

    with pytest.raises(Stop):
        store.install(f"{base}/faces.tar.gz", progress=progress)
    assert store_state(store) == [] and store.list() == []


def test_leftover_staging_is_cleared_on_start(tmp_path: Path) -> None:
    root = tmp_path / "s"
    (root / ".staging" / "dead" / "pkg").mkdir(parents=True)
    (root / ".staging" / "dead" / "pkg" / "model.json").write_text("{}")
    ModelStore(root)
    assert list((root / ".staging").iterdir()) == []


def test_active_pointer_is_a_whole_file(store: ModelStore, pkg: Path) -> None:
    store.install(pkg)
    assert (store.root / "faces" / ".active").read_text() == "1.0\n"
    assert not [p for p in (store.root / "faces").iterdir() if ".tmp" in p.name]


def test_toml_manifest(store: ModelStore, pkg: Path) -> None:
    m = load_manifest(pkg)
    (pkg / "model.json").unlink()
    f = m.files["tflite"]
    (pkg / "model.toml").write_text(
        f'name = "faces"\nversion = "3.0"\ntask = "detection"\nlabels = ["face"]\n'
        f'[files.tflite]\npath = "{f.path}"\nsha256 = "{f.sha256}"\n'
        '[input]\nwidth = 128\nheight = 128\nmean = [127.5]\nstd = [127.5]\n'
        '[decoder]\ntype = "blazeface"\n'
    )
    assert store.install(pkg).version == "3.0"


def test_manifest_rejects_mismatched_decoder(pkg: Path) -> None:
    m = json.loads((pkg / "model.json").read_text())
    m["task"] = "classification"
    (pkg / "model.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="does not fit task"):
        load_manifest(pkg)
