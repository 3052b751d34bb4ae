"""The training pieces on their own: the annotations CSV reader, data-directory confinement, plugin discovery
through entry points (with a third-party distribution made on the fly), the artifact server, and the request
the node forwards. Fast: no broker, no training."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import requests

from agent.jobs import registry
from agent.jobs.base import JobError
from agent.trainer import annotations
from agent.trainer.annotations import AnnotationError, parse_csv
from agent.trainer.config import TrainerConfig
from agent.trainer.messages import TrainParams
from agent.trainer.offload import peer_job_id
from tests.agent_proc import REPO


def _lines(e: AnnotationError) -> list[int]:
    return [n for n, _ in e.problems]


def test_csv_layouts_by_header_or_position() -> None:
    ours = parse_csv("a.png,1,2,3,4,cat\nb.png,0,0,5,5,dog\n", "x.csv")
    assert ours == [(1, "a.png", 1.0, 2.0, 3.0, 4.0, "cat"), (2, "b.png", 0.0, 0.0, 5.0, 5.0, "dog")]
    reordered = parse_csv("label,height,width,y,x,url\ncat,4,3,2,1,a.png\n", "x.csv")
    assert reordered == [(2, "a.png", 1.0, 2.0, 3.0, 4.0, "cat")]
    vott = parse_csv("image,xmin,ymin,xmax,ymax,label\n\na.png,1,2,4,6,cat\n", "x.csv")
    assert vott == [(3, "a.png", 1.0, 2.0, 3.0, 4.0, "cat")]  # the blank line still counts


@pytest.mark.parametrize("text, line, words", [
    ("", 1, "the file is empty"),
    ("\n\n", 1, "the file is empty"),
    ("image,x,y,width,height,class\n", 2, "no annotation rows after the header"),
    ("a.png;0;0;8;8;1\n", 1, "separated by ';'"),
    ("name,left,top,class,extra,more\na.png,0,0,8,8,1\n", 1, "unknown column layout: header"),
    ("a.png,0,0,8,8,1\nb.png,0,zero,8,8,1\n", 2, "y is 'zero', not a number"),
    ("a.png,0,0,8,8,1\nb.png,0,0,0,8,1\n", 2, "the box has no area"),
    ("a.png,0,0,8,8,1\nb.png,0,0,8,8, \n", 2, "the class column is empty"),
    ("a.png,0,0,8,8,1\nb.png,0,0,nan,8,1\n", 2, "not a finite number"),
])
def test_csv_problems_name_the_line(text: str, line: int, words: str) -> None:
    with pytest.raises(AnnotationError) as e:
        parse_csv(text, "x.csv")
    assert _lines(e.value)[0] == line and words in e.value.message
    assert e.value.message.startswith(f"x.csv: line {line}: ") and e.value.code == "bad_annotations"


def test_several_problems_are_reported_together() -> None:
    text = "a.png,0,0,8,8,1\n" + "".join(f"b.png,0,0,-1,8,{i}\n" for i in range(15))
    with pytest.raises(AnnotationError) as e:
        parse_csv(text, "x.csv")
    assert _lines(e.value)[:3] == [2, 3, 4] and "(and " in e.value.message
    assert len(e.value.details["errors"]) == 10


def _png(path: Path, w: int = 8, h: int = 6) -> None:
    import cv2
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((h, w), 200, dtype=np.uint8))


def test_images_are_checked_and_confined_to_the_data_dirs(tmp_path: Path) -> None:
    data, outside = tmp_path / "data", tmp_path / "outside"
    _png(data / "img" / "a.png")
    _png(outside / "b.png")
    (data / "img" / "link.png").symlink_to(outside / "b.png")
    (data / "ok.csv").write_text("img/a.png,0,0,8,6,x\nimg/a.png,1,1,2,2,y\n")
    ds = annotations.load("ok.csv", TrainerConfig(data_dirs=[data]))
    assert ds.labels == ["x", "y"] and ds.image_sizes == {str((data / "img/a.png").resolve()): (8, 6)}
    assert ds.crop(ds.samples[1]).shape == (2, 2, 3)
    (data / "bad.csv").write_text("img/a.png,0,0,8,6,x\n../outside/b.png,0,0,8,6,x\nimg/link.png,0,0,8,6,x\n"
                                  "img/a.png,0,0,8,7,x\nimg/none.png,0,0,1,1,x\n")
    with pytest.raises(AnnotationError) as e:
        annotations.load("bad.csv", TrainerConfig(data_dirs=[data]))
    assert _lines(e.value) == [2, 3, 4, 5]
    msgs = dict(e.value.problems)
    assert "outside the build peer's data directories" in msgs[2] and "trainer.data_dirs" in msgs[3]
    assert "lies outside image 'img/a.png', which is 8x6 pixels" in msgs[4] and "'img/none.png' not found" in msgs[5]
    with pytest.raises(JobError) as e2:
        annotations.load(str(data / "ok.csv"), TrainerConfig())
    assert e2.value.code == "annotations_unavailable" and "set trainer.data_dirs on the peer" in e2.value.message
    with pytest.raises(JobError) as e3:
        annotations.load(str(outside / "b.png"), TrainerConfig(data_dirs=[data]))
    assert "outside the build peer's data directories" in e3.value.message


def test_plugins_come_from_entry_points_of_any_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.trainer.plugins import TrainerPlugin, available, load_plugin, parse_options

    site = tmp_path / "site"
    (site / "acme_plugin-1.0.dist-info").mkdir(parents=True)
    (site / "acme_plugin-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-plugin\n"
                                                                   "Version: 1.0\n")
    (site / "acme_plugin-1.0.dist-info" / "entry_points.txt").write_text(
        "[cv_worker.trainer_plugins]\nacme = acme_plugin:Acme\nbroken = acme_missing:Nope\n")
    (site / "acme_plugin.py").write_text(textwrap.dedent("""
        from pydantic import BaseModel, ConfigDict
        from agent.trainer.plugins import TrainerPlugin

        class Opts(BaseModel):
            model_config = ConfigDict(extra="forbid")
            depth: int = 3

        class Acme(TrainerPlugin):
            name = "acme"
            options_model = Opts

            def train(self, data, options, ctx):
                raise NotImplementedError
    """))
    monkeypatch.syspath_prepend(str(site))
    assert {"classifier", "acme", "broken"} <= set(available())
    acme = load_plugin("acme")
    assert isinstance(acme, TrainerPlugin) and parse_options(acme, {"depth": 5}).depth == 5
    with pytest.raises(JobError) as e:
        parse_options(acme, {"detph": 5})
    assert e.value.code == "invalid_options" and "its options: depth" in e.value.message
    with pytest.raises(JobError) as e:
        load_plugin("broken")
    assert e.value.code == "plugin_unavailable" and "acme_missing" in e.value.message
    with pytest.raises(JobError) as e:
        load_plugin("nope", "build peer b1")
    assert e.value.code == "unknown_plugin" and "no trainer plugin 'nope' on build peer b1" in e.value.message


def test_artifact_server_serves_packages_read_only(tmp_path: Path) -> None:
    from agent.trainer.artifacts import ArtifactServer, archive

    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "model.json").write_text("{}")
    srv = ArtifactServer(tmp_path / "artifacts", "127.0.0.1", 0).start()
    try:
        sha, size = archive(pkg, srv.path_for("job-1", "m-1.tar.gz"))
        (tmp_path / "secret.txt").write_text("no")
        url = srv.url_for("job-1", "m-1.tar.gz")
        assert url == f"http://127.0.0.1:{srv.port}/artifacts/job-1/m-1.tar.gz"
        r = requests.get(url, timeout=5)
        assert r.status_code == 200 and len(r.content) == size and r.headers["Content-Type"] == "application/gzip"
        for bad in ("/artifacts/", "/artifacts/job-1", "/artifacts/..%2F..%2Fsecret.txt/x", "/secret.txt",
                    "/artifacts/job-1/..%2F..%2Fsecret.txt", "/artifacts/job-1/.m-1.tar.gz.tmp"):
            assert requests.get(srv.base_url + bad, timeout=5).status_code == 404, bad
        assert requests.delete(url, timeout=5).status_code == 405
    finally:
        srv.stop()


def test_node_forwards_the_training_request_without_its_own_fields() -> None:
    p = TrainParams.model_validate({"annotations": "a.csv", "deploy": False, "peer": "*", "grace_period_s": 5,
                                    "epochs": 3, "options": {"width": 8}})
    assert p.request().model_dump(exclude_none=True) == {
        "annotations": "a.csv", "plugin": "classifier", "epochs": 3, "batch_size": 32, "name": "trained",
        "validation_split": 0.2, "seed": 0, "options": {"width": 8}}
    with pytest.raises(ValueError):
        TrainParams.model_validate({"annotations": "a.csv", "epoch": 3})
    long = peer_job_id("n" * 100, "j" * 128)
    assert len(long) <= 128 and long == peer_job_id("n" * 100, "j" * 128)
    assert peer_job_id("edge-1", "j1") == "edge-1.j1"


def test_train_means_offload_on_a_node_and_training_on_a_peer() -> None:
    registry.load_builtin()
    registry.load_trainer()
    node_train, peer_train = registry.get("train"), registry.get("train", registry.TRAINER)
    assert node_train is not None and peer_train is not None and node_train is not peer_train
    assert node_train().resumable(None) and "infer" not in registry.handlers(registry.TRAINER)
    assert registry.get("job.cancel") is registry.get("job.cancel", registry.TRAINER)


def test_neither_agent_nor_trainer_imports_torch_at_start() -> None:
    code = ("import sys; from agent.cli import build_parser; build_parser(); from agent.node import Node; "
            "from agent.trainer.peer import TrainerPeer; from agent.jobs import registry; registry.load_builtin(); "
            "registry.load_trainer(); print(sorted(m for m in ('torch', 'openvino', 'onnx') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
