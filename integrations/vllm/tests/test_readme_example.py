"""The README's vLLM example runs as written: the export command in its comment, then
the snippet itself as a script, from the repository root."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _example() -> str:
    section = (ROOT / "README.md").read_text().split("## Serving and vLLM", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_vllm_example_runs_as_written(tmp_path):
    code = _example()
    export = re.search(r"# (guardrail export-vllm .*)", code).group(1).split()
    target = export[-1]
    assert target == "./organism-vllm" and target in code
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # the commented command, with this venv's CLI, into a temporary directory
    where = tmp_path / "organism-vllm"
    argv = [sys.executable, "-m", "guardrail.cli", *export[1:-1], str(where)]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    script = tmp_path / "example.py"
    script.write_text(code.replace(target, str(where)))  # the only change: where it lives
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    # print(out.text, out.decision.intervened): the answer (maybe several lines), then
    # the decision; vLLM's own log lines may follow on stdout
    assert re.search(r" (True|False)$", done.stdout, re.M), done.stdout[-3000:]
