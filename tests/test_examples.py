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


def test_distributed_example_makes_one_asset_per_checkpoint_from_every_rank() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "distributed_checkpoint.py"),
            "--ranks",
            "3",
            "--steps",
            "3",
            "--shard-mb",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=CEILING,
        env=subprocess_env(),
    )
    assert result.returncode == 0, result.stderr
    assert "on the server: ['checkpoint-200', 'checkpoint-300'] (retention keep_last=2)" in (
        result.stdout
    )
    assert result.stdout.count("from 3 ranks, downloaded copy is byte-identical (sha256)") == 2
    assert result.stdout.count("finalized") == 9 and "FAILED" not in result.stdout
