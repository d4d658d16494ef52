"""The examples the README points to run as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import CEILING, subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_example_runs_and_verifies_its_download() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--size-mb", "16"],
        capture_output=True,
        text=True,
        timeout=CEILING,
        env=subprocess_env(),
    )
    assert result.returncode == 0, result.stderr
    assert "downloaded copy is byte-identical (sha256)" in result.stdout
