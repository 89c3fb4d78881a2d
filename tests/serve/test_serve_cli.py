"""``guardrail serve``: inputs checked before the model loads, then a real server process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from guardrail.cli import main
from guardrail.serve.server import free_port
from guardrail.testing import cached_tiny_model, tiny_policy
from tests.serve.conftest import run_json


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, processor = cached_tiny_model("llama")
    root = tmp_path_factory.mktemp("bundle")
    return tiny_policy(model, processor, name="tiny", version="1.0.0").save_pretrained(root / "b")


def test_bad_inputs_fail_before_the_model_loads(
    no_model: None, bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["serve", "--model", "tiny-llama", "--port", str(free_port())]
    code, out = run_json([*base, "--policy", str(tmp_path / "missing")], capsys)
    assert code == 1 and out["error"]["type"] == "BundleNotFoundError"
    bad = tmp_path / "rollout.yaml"
    bad.write_text("stable: ./b\ncanary: {ref: ./c, share: 2}\n")
    code, out = run_json([*base, "--policy", str(bundle), "--rollout", str(bad)], capsys)
    assert code == 1 and "canary.share" in out["error"]["message"]
    short = tmp_path / "token"
    short.write_text("hunter2")
    code, out = run_json([*base, "--policy", str(bundle), "--admin-token-file", str(short)], capsys)
    assert code == 1 and "fewer than 16 characters" in out["error"]["message"]
    assert "hunter2" not in out["error"]["message"]
    # The main venv has no vLLM: the error names the integration to install.
    code, out = run_json([*base, "--policy", str(bundle), "--engine", "vllm"], capsys)
    assert code == 1 and "pip install vllm-mars-guardrail" in out["error"]["message"]
    code, out = run_json(["serve", "--model", "tiny-llama", "--policy", "tiny@^1"], capsys)
    assert code == 1 and "--registry" in out["error"]["message"]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out = run_json(
            ["serve", "--model", "tiny-llama", "--policy", str(bundle), "--port", str(port)], capsys
        )
    assert code == 1 and "pick another --port" in out["error"]["message"]
    with pytest.raises(SystemExit) as usage:
        main(["serve", "--model", "tiny-llama", "--port", "0", "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert usage.value.code == 2 and out["error"]["type"] == "UsageError"


def test_the_command_serves_a_guarded_model(bundle: Path, tmp_path: Path) -> None:
    port = free_port()
    token = "t" * 32
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GUARDRAIL_ADMIN_TOKEN": token}
    process = subprocess.Popen(
        [sys.executable, "-m", "guardrail.cli", "serve", "--model", "tiny-llama"]
        + ["--policy", str(bundle), "--port", str(port), "--max-new-tokens", "4"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.communicate()[1][-2000:]
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.2)
        body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Hi"}]}
        response = httpx.post(url + "/v1/chat/completions", json=body, timeout=30).json()
        assert response["usage"]["completion_tokens"] == 4  # the server's --max-new-tokens
        assert response["guardrail"]["policy_version"] == "1.0.0"
        admin = httpx.get(url + "/admin/policies", headers={"Authorization": f"Bearer {token}"})
        assert admin.status_code == 200 and admin.json()["policy"]["ref"] == "tiny@1.0.0"
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    access = [x for x in lines if x.get("event") == "http.request"]
    assert any(x["path"] == "/v1/chat/completions" and x["status"] == 200 for x in access)
    assert token not in err and "Hi" not in {str(v) for x in access for v in x.values()}
