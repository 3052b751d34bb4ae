"""OpenVINO's converter sends usage telemetry from a forked copy of the caller unless told not to: the agent must
never fork itself that way (a forked many-threaded daemon, network calls from an edge node)."""

from __future__ import annotations

import subprocess
import sys

from tests.agent_proc import REPO


def test_importing_openvino_through_the_backend_loads_the_telemetry_stub_and_forks_nothing() -> None:
    code = (
        "import multiprocessing, sys\n"
        "from accelerators.openvino_backend import import_openvino\n"
        "import_openvino()\n"
        "import openvino as ov, openvino.tools.ovc.telemetry_utils as t\n"
        "ov.convert_model  # the converter, whose import sends the first event\n"
        "print(t.tm.__name__, len(multiprocessing.active_children()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["openvino.tools.ovc.telemetry_stub", "0"], out.stdout

