"""The runnable example in docs/discovery.md runs and prints what the document says it prints."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.discovery.conftest import REPO, subprocess_env


def test_docs_example_runs_as_documented() -> None:
    text = (REPO / "docs" / "discovery.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)
    example = next(c for c in code if "browse(timeout=" in c)
    expected = re.search(r"Expected output:\n\n```\n(.*?)```", text, re.S).group(1)
    out = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, timeout=30,
                         env=subprocess_env(), cwd=REPO)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if "demo-node" in ln]
    assert lines == expected.strip().splitlines(), out.stdout
