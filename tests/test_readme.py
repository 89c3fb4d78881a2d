"""The README's Quick start runs as written, on a tiny model (issue 27)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from guardrail.testing import random_image

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def quick_start() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quick_start_runs_as_written_on_a_tiny_model(tmp_path):
    code = quick_start()
    model_id = re.search(r'load_model\("([^"]+)"', code).group(1)
    code = code.replace(f'"{model_id}"', '"tiny-llava"', 1)  # the only change
    random_image(3, 64).save(tmp_path / "photo.png")
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "policies" / "qwen25vl" / "1.0.0" / "manifest.json").is_file()
    text, score, intervened, refused = proc.stdout.rsplit(" ", 3)
    assert intervened in ("True", "False") and refused.strip() in ("True", "False")
    float(score)
