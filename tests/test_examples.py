"""Every script in examples/ runs, on tiny models, as a user would run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run(*args: str, timeout: float = 300) -> str:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_quickstart_calibrates_then_guards(tmp_path):
    out = run(
        str(EXAMPLES / "quickstart.py"), "tiny-llava", "--quick", "--out", str(tmp_path / "b")
    )
    assert "calibrated PolicyBundle(mymodel@1.0.0" in out
    assert out.count("score=") == 2
    assert (tmp_path / "b" / "manifest.json").is_file()


def test_rollout_example_serves_both_arms_and_promotes():
    out = run(str(EXAMPLES / "rollout.py"), "tiny-llama")
    served = out.split("served:", 1)[1].splitlines()[0]
    assert "('stable', '1.0.0')" in served and "('canary', '1.1.0')" in served
    assert "after promote: stable 1.1.0" in out


def test_rollout_yaml_is_a_valid_config():
    from guardrail.policy.rollout import RolloutConfig

    config = RolloutConfig.from_file(EXAMPLES / "rollout.yaml")
    assert config.canary is not None and config.canary.share == 0.1
    assert yaml.safe_load((EXAMPLES / "rollout.yaml").read_text())["shadow"] == config.shadow


def test_fastapi_backend_answers_streams_and_rejects_paths(monkeypatch):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    monkeypatch.setenv("GUARDRAIL_MODEL", "tiny-llava")
    sys.path.insert(0, str(ROOT))
    try:
        from examples import fastapi_backend
    finally:
        sys.path.remove(str(ROOT))
    client = TestClient(fastapi_backend.app)
    body = {"messages": [{"role": "user", "content": "Hi"}], "user": "alice", "max_new_tokens": 4}
    reply = client.post("/chat", json=body).json()
    assert reply["guardrail"]["intervened"] is True and isinstance(reply["text"], str)
    stream = client.post("/chat/stream", json=body).text
    assert "event: done" in stream and '"intervened": true' in stream
    path_part = {"type": "image", "image": str(ROOT / "README.md")}
    bad = {"messages": [{"role": "user", "content": [path_part, {"type": "text", "text": "?"}]}]}
    rejected = client.post("/chat", json=bad)
    assert rejected.status_code == 400 and "path" in rejected.json()["detail"]


def test_langchain_chain():
    pytest.importorskip("langchain_mars_guardrail")
    out = run(str(EXAMPLES / "langchain_chain.py"), "tiny-llava")
    assert "intervened=True" in out


def test_llamaindex_chat_engine():
    pytest.importorskip("llama_index.llms.mars_guardrail")
    out = run(str(EXAMPLES / "llamaindex_chat_engine.py"), "tiny-llava")
    assert "intervened=True" in out
