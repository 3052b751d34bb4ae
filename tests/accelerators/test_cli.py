"""`cv-worker accelerators` and `cv-worker models ...` through their argparse parsers and handlers."""

from __future__ import annotations

import argparse
import json
import types
from pathlib import Path
from typing import Any

import pytest

from accelerators.cli import add_parsers as add_accel
from models.cli import add_parsers as add_models
from models.config import ModelsConfig


def run(argv: list[str], cfg: Any) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config")
    p = argparse.ArgumentParser(prog="cv-worker")
    sub = p.add_subparsers(dest="command")
    add_accel(sub, common)
    add_models(sub, common)
    args = p.parse_args(argv)
    return args.func(args, cfg)


@pytest.fixture
def cfg(tmp_path: Path) -> Any:
    return types.SimpleNamespace(models=ModelsConfig(dir=tmp_path / "models"), state_dir=tmp_path)


def test_models_lifecycle(cfg: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["models", "install", "blazeface"], cfg) == 0
    assert "blazeface 0.6.0 installed and active; runs on litert:CPU" in capsys.readouterr().out
    assert run(["models", "list", "--json"], cfg) == 0
    assert [m["name"] for m in json.loads(capsys.readouterr().out)] == ["blazeface"]
    assert run(["models", "show", "blazeface", "--verify", "--json"], cfg) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["verified"] is True and shown["placement"]["chosen"]["backend"] == "litert"
    assert run(["models", "show", "blazeface", "--verify"], cfg) == 0
    assert "all files match" in capsys.readouterr().out
    assert run(["models", "remove", "blazeface"], cfg) == 0
    assert "removed blazeface 0.6.0" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["models", "install", "/no/such/dir"], "is not a directory, a .tar.gz file"),
        (["models", "show", "nope"], "is not installed"),
        (["models", "remove", "nope"], "is not installed"),
        (["models", "remove", "../x"], "invalid model name"),
        (["models", "install", "http://127.0.0.1:9/x.tar.gz"], "download of"),
    ],
)
def test_errors_are_one_clear_line(cfg: Any, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert run(argv, cfg) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.startswith("cv-worker: error:")


def test_invalid_manifest_lists_fields(cfg: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.json").write_text(json.dumps({"name": "x", "version": "1", "task": "detection"}))
    assert run(["models", "install", str(bad)], cfg) == 1
    err = capsys.readouterr().err
    assert "invalid manifest" in err and "  files:" in err and "  decoder:" in err


def test_catalog_listing(cfg: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["models", "list", "--catalog", "--json"], cfg) == 0
    assert {r["name"] for r in json.loads(capsys.readouterr().out)} == {"blazeface", "blazeface-full", "ppocr-det"}


def test_accelerators_command(cfg: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["models", "install", "ppocr-det"], cfg) == 0
    capsys.readouterr()
    assert run(["accelerators", "--json"], cfg) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {b["name"] for b in doc["backends"]} == {"openvino", "litert", "opencv"}
    [sel] = doc["models"]
    assert sel["model"] == "ppocr-det" and sel["chosen"]["backend"] == "openvino"
    assert any("no tflite file" in c["reason"] for c in sel["candidates"])
    assert run(["accelerators"], cfg) == 0
    out = capsys.readouterr().out
    assert "Model placement" in out and "Backends" in out


def test_help_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run(["models", "install", "--help"], None)
    out = capsys.readouterr().out
    assert "catalog name" in out and "sha256" in out and "smoke test" in out
    with pytest.raises(SystemExit):
        run(["accelerators", "--help"], None)
    assert "1a6e:089a" in capsys.readouterr().out
