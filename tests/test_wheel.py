"""A user's install: build the wheel, install it into a fresh virtual environment, and
run ``guardrail demo`` from a directory outside the checkout (issue 27)."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_the_demo_runs_from_an_installed_wheel(tmp_path):
    dist = tmp_path / "dist"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = dist.glob("mars_guardrail-*.whl")

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    target = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    # The fresh environment borrows the test environment's third-party packages (torch,
    # transformers, ...) through a path entry, but not its editable install of this
    # checkout (the editable finder is a .pth file there, and .pth files are only run
    # in site directories): the guardrail it imports is the installed wheel's.
    (target / "borrowed.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    where = subprocess.run(
        [str(python), "-c", "import guardrail; print(guardrail.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    ).stdout.strip()
    assert where.startswith(str(target)), where

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    demo = subprocess.run(
        [
            str(python),
            "-m",
            "guardrail.cli",
            "demo",
            "--max-new-tokens",
            "4",
            "--modalities",
            "text",
        ],
        capture_output=True,
        text=True,
        cwd=outside,
        env={**env, "OMP_NUM_THREADS": "1"},
        timeout=900,
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "policy PolicyBundle(organism@1.0.0" in demo.stdout
    assert demo.stdout.count("guarded  :") == 4
