"""The examples run as a user runs them (a subprocess, the embedded default model)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT


@pytest.mark.real
def test_prune_and_generate(tmp_path: Path, surgery_cache: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "prune_and_generate.py"), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "30 -> 28 layers" in done.stdout
    # Dropping layers 12-13 keeps SmolLM2's answer (measured; dropping 10-11 or 16-17 does not).
    assert "Paris" in done.stdout
    assert "layers: 0-11,14-29" in (tmp_path / "out" / "surgery-recipe.yaml").read_text()  # the written model is the pruned one
