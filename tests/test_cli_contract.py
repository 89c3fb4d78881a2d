"""The CLI's contract: documented exit codes, usage errors without tracebacks, and
paths checked before a model is loaded."""

from __future__ import annotations

import pytest

import guardrail.models.loading
from guardrail.cli import EXIT_ERROR, EXIT_INTEGRITY, EXIT_USAGE, main

CALIBRATE = ["calibrate", "--model", "tiny-llama", "--harmful", "harmful", "--harmless"]


@pytest.mark.parametrize(
    "extra",
    [
        ["--lam-grid", "a,b"],
        ["--kappa-grid", "1,,x"],
        ["--layers", "x"],
        ["--batch-size", "0"],
    ],
)
def test_bad_arguments_are_usage_errors_without_a_traceback(extra, capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        main([*CALIBRATE, "harmless", "--out", str(tmp_path / "out"), *extra])
    assert stop.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert extra[0] in err and "Traceback" not in err


@pytest.fixture
def no_model_load(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the policy path was checked")

    monkeypatch.setattr(guardrail.models.loading, "load_model", forbidden)


def test_a_missing_bundle_is_not_an_integrity_failure(capsys, tmp_path, no_model_load):
    missing = str(tmp_path / "nowhere")
    assert main(["policy", "show", missing]) == EXIT_ERROR
    assert main(["policy", "verify", missing]) == EXIT_ERROR
    code = main(["generate", "--model", "tiny-llama", "--prompt", "hi", "--policy", missing])
    assert code == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.count("is not a directory") == 3 and "Traceback" not in err


def test_a_tampered_bundle_is_still_an_integrity_failure(tmp_path, capsys):
    from guardrail.testing import random_policy, tiny_model

    model, tok = tiny_model("llama")
    path = random_policy(model, tok, layer=1).save_pretrained(tmp_path / "b")
    manifest = path / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"tau": 0.5', '"tau": -9.0'))
    assert main(["policy", "verify", str(path)]) == EXIT_INTEGRITY
    assert "digest does not match" in capsys.readouterr().err


def test_an_unreadable_events_file_is_a_plain_error(tmp_path, capsys):
    assert main(["rollout", "report", str(tmp_path / "none.jsonl")]) == EXIT_ERROR
    assert "Traceback" not in capsys.readouterr().err


def test_json_errors_are_json(capsys, tmp_path, no_model_load):
    import json

    missing = str(tmp_path / "nowhere")
    assert main(["policy", "show", missing, "--json"]) == EXIT_ERROR
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["type"] == "BundleNotFoundError" and error["exit_code"] == EXIT_ERROR
    with pytest.raises(SystemExit):
        main([*CALIBRATE, "harmless", "--out", missing, "--layers", "x", "--json"])
    usage = json.loads(capsys.readouterr().out)["error"]
    assert usage["type"] == "UsageError" and "--layers" in usage["message"]


def test_eval_and_calibrate_check_their_inputs_before_the_model(tmp_path, capsys, no_model_load):
    from guardrail.testing import random_policy, tiny_model

    missing = str(tmp_path / "nowhere")
    assert main(["eval", "--model", "tiny-llama", "--policy", missing]) == EXIT_ERROR
    bundle = random_policy(*tiny_model("llama"), layer=1).save_pretrained(tmp_path / "b")
    code = main(["eval", "--model", "tiny-llama", "--policy", str(bundle), "--dataset", missing])
    assert code == EXIT_ERROR
    code = main([*CALIBRATE, missing, "--out", str(tmp_path / "new")])
    assert code == EXIT_ERROR
    # a bundle already at --out is a release: never overwritten by a recalibration
    code = main([*CALIBRATE, "harmless", "--out", str(bundle)])
    assert code == EXIT_ERROR
    assert "immutable" in capsys.readouterr().err
