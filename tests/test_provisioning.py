"""`cv-worker provision` into a temporary root, the unit/udev files, and the watchdog health logic.

The real boot (systemd, journal, restarts) is `make test-system`; these run in a second or two."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest

from agent.cli import main
from agent.config import load_config
from agent.node import Node
from agent.sdnotify import watchdog_interval_s
from provisioning import assets

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "cv-worker.service"
RULES = REPO / "systemd" / "99-cv-worker-accelerators.rules"
USER = "nobody"  # exists everywhere; provisioning a temp root never creates users


def provision(root: Path, *extra: str) -> int:
    return main(["provision", "--root", str(root), "--yes", "--skip-accelerators", "--skip-broker-check",
                 "--no-start", "--user", USER, *extra])


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "etc").mkdir(parents=True)
    (r / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    return r


def statuses(out: str) -> list[str]:
    return [line.split()[1] for line in out.splitlines() if line.startswith("  ")]


def test_provision_writes_a_working_node(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    assert provision(root, "--broker", "broker.lan:8883", "--username", "pi", "--password-file", str(pw),
                     "--pools", "cameras,ocr") == 0
    out = capsys.readouterr().out
    assert "done: node ready" in out and "node id cvw-0123456789ab" in out
    conf = root / "etc/cv-worker/config.toml"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o640
    assert stat.S_IMODE((root / "etc/cv-worker/mqtt-password").stat().st_mode) == 0o640
    assert (root / "etc/cv-worker/mqtt-password").read_text() == "s3cret\n"
    assert "s3cret" not in conf.read_text()  # the secret lives only in its own file
    for d in ("var/lib/cv-worker", "var/lib/cv-worker/models"):
        assert stat.S_IMODE((root / d).stat().st_mode) == 0o750
    conf.write_text(conf.read_text().replace("/etc/cv-worker/", f"{root}/etc/cv-worker/"))  # paths into the root
    cfg = load_config(conf)
    assert (cfg.node_id, cfg.mqtt.host, cfg.mqtt.port, cfg.pools) == ("cvw-0123456789ab", "broker.lan", 8883,
                                                                      ["cameras", "ocr"])
    assert cfg.mqtt.read_password() == "s3cret"
    assert (root / "etc/udev/rules.d/99-cv-worker-accelerators.rules").read_text() == RULES.read_text()
    assert (root / "etc/systemd/system/cv-worker.service").read_text() == UNIT.read_text()
    link = root / "etc/systemd/system/multi-user.target.wants/cv-worker.service"
    assert os.readlink(link) == "/etc/systemd/system/cv-worker.service"


def test_rerun_is_idempotent_and_keeps_earlier_answers(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert provision(root, "--broker", "b.lan", "--pools", "p1") == 0
    capsys.readouterr()
    before = (root / "etc/cv-worker/config.toml").read_text()
    assert provision(root) == 0  # no flags: the existing config supplies the defaults
    out = capsys.readouterr().out
    assert not {"created", "updated"} & set(statuses(out)), out
    assert (root / "etc/cv-worker/config.toml").read_text() == before


def test_owner_edits_are_kept_unless_forced(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert provision(root, "--broker", "b.lan") == 0
    conf = root / "etc/cv-worker/config.toml"
    conf.write_text(conf.read_text() + "# tuned by the owner\n")
    capsys.readouterr()
    assert provision(root, "--broker", "other.lan") == 0
    assert "edited by its owner" in capsys.readouterr().out
    assert "# tuned by the owner" in conf.read_text() and "other.lan" not in conf.read_text()
    assert provision(root, "--broker", "other.lan", "--force") == 0
    assert "other.lan" in conf.read_text() and "# tuned" not in conf.read_text()


def test_answers_file_and_bad_input(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    answers = tmp_path / "node.toml"
    answers.write_text('node_id = "pi-garage"\nbroker = "10.0.0.2"\npools = ["a"]\naccelerator = "coral"\n')
    assert main(["provision", "--root", str(root), "--answers", str(answers), "--skip-accelerators",
                 "--skip-broker-check", "--no-start", "--user", USER]) == 0
    assert 'node_id = "pi-garage"' in (root / "etc/cv-worker/config.toml").read_text()
    answers.write_text('node_id = "x"\nbrokr = "typo"\n')
    assert main(["provision", "--root", str(root), "--answers", str(answers)]) == 2
    assert "unknown keys brokr" in capsys.readouterr().err
    assert provision(root, "--node-id", "bad/id") == 2


def test_dry_run_changes_nothing(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert provision(root, "--dry-run") == 0
    assert not (root / "etc/cv-worker/config.toml").exists()
    assert "(dry run)" in capsys.readouterr().out


def test_embedded_assets_match_systemd_dir() -> None:
    # A wheel has no systemd/ directory; provisioning/assets.py carries copies that must not drift.
    assert assets.UNIT == UNIT.read_text(), "update provisioning/assets.py from systemd/cv-worker.service"
    assert assets.UDEV_RULES == RULES.read_text(), "update provisioning/assets.py from systemd/*.rules"


def test_udev_rules_cover_every_stick() -> None:
    rules = RULES.read_text()
    for vid, pid in (("1a6e", "089a"), ("18d1", "9302"), ("03e7", "2150"), ("03e7", "2485")):
        assert f'ATTRS{{idVendor}}=="{vid}", ATTRS{{idProduct}}=="{pid}"' in rules
    assert 'SUBSYSTEM=="apex"' in rules
    assert all('GROUP="cv-worker"' in line for line in rules.splitlines() if line.startswith("SUBSYSTEM"))


def test_unit_settings() -> None:
    text = UNIT.read_text()
    for needle in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "StartLimitBurst=", "User=cv-worker",
                   "StateDirectory=cv-worker", "ConfigurationDirectory=cv-worker", "DeviceAllow=char-usb_device rw",
                   "DeviceAllow=char-apex rw", "DevicePolicy=closed"):
        assert needle in text


def _analyze() -> str:
    # `make test` installs systemd (for systemd-analyze): its absence is a missing install step, not a skip.
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd (make test does)")
    return exe


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart exists: point it at this venv's cv-worker.
    exe = Path(sys.executable).parent / "cv-worker"
    unit = tmp_path / "cv-worker.service"
    unit.write_text(UNIT.read_text().replace("/opt/cv-worker/venv/bin/cv-worker", str(exe)))
    r = subprocess.run([_analyze(), "verify", str(unit)], capture_output=True, text=True)
    problems = [line for line in (r.stdout + r.stderr).splitlines() if "cv-worker.service" in line]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


def test_security_exposure_at_most_2() -> None:
    r = subprocess.run([_analyze(), "security", "--offline=yes", str(UNIT)], capture_output=True, text=True)
    line = [x for x in r.stdout.splitlines() if "Overall exposure level" in x]
    assert line, r.stdout + r.stderr
    score = float(line[0].split(":")[1].split()[0])
    assert score <= 2.0, line[0]


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert watchdog_interval_s() is None
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval_s() == 10.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert watchdog_interval_s() is None


def _fake_node(alive: dict[str, bool], pending: int = 0) -> types.SimpleNamespace:
    def thread(name: str, is_alive: bool) -> types.SimpleNamespace:
        return types.SimpleNamespace(name=name, is_alive=lambda: is_alive)

    intake_q = types.SimpleNamespace(qsize=lambda: pending)
    return types.SimpleNamespace(
        engine=types.SimpleNamespace(_threads=[thread(n, a) for n, a in alive.items() if n != "intake"]),
        intake=types.SimpleNamespace(_thread=thread("intake", alive.get("intake", True)), _q=intake_q,
                                     accepted=0, rejected=0),
        config=types.SimpleNamespace(jobs=types.SimpleNamespace(workers=2)),
    )


def test_loops_healthy() -> None:
    ok = {"job-worker-1": True, "job-worker-2": False, "job-control": True, "job-watch": True}
    assert Node.loops_healthy(_fake_node(ok)) is True
    for dead in ("job-control", "job-watch", "intake"):
        assert Node.loops_healthy(_fake_node({**ok, dead: False})) is False
    assert Node.loops_healthy(_fake_node({**ok, "job-worker-1": False})) is False
    stuck = _fake_node(ok, pending=3)
    assert Node.loops_healthy(stuck, stall_s=0.05) is True  # first sight of the backlog
    threading.Event().wait(0.1)
    assert Node.loops_healthy(stuck, stall_s=0.05) is False  # same backlog, no progress
