"""Operating the guardrail as a user would (issue 27): the decision log and the canary
report, the rollout arm everywhere, safe defaults."""

from __future__ import annotations

import json

import pytest

from guardrail import Guardrail
from guardrail.cli import EXIT_CANARY_FLAGGED, EXIT_OK, main
from guardrail.observability.events import CallbackSink, JsonlSink

from .conftest import random_policy, tiny

PROMPTS = [f"Tell me about topic {k}." for k in range(24)]


def _rollout(tmp_path, canary_tau: float, stable_tau: float = 1e6):
    model, tok = tiny("llama")
    quiet = random_policy(model, tok, layer=1, name="p", version="1.0.0", tau=stable_tau, lam=4.0)
    loud = random_policy(model, tok, layer=1, name="p", version="1.1.0", tau=canary_tau, lam=4.0)
    stable = quiet.save_pretrained(tmp_path / "stable")
    canary = loud.save_pretrained(tmp_path / "canary")
    return model, tok, {"stable": str(stable), "canary": {"ref": str(canary), "share": 0.5}}


def _serve(tmp_path, canary_tau: float, **sink_kwargs) -> tuple[str, list]:
    model, tok, config = _rollout(tmp_path, canary_tau)
    log = tmp_path / "events.jsonl"
    sink = JsonlSink(log, **sink_kwargs)
    guard = Guardrail(model, tok, rollout=config, sinks=[sink], max_new_tokens=2)
    results = guard.generate(PROMPTS, key=[f"user-{k}" for k in range(len(PROMPTS))])
    sink.close()
    return str(log), results


def test_a_canary_that_steers_everything_is_flagged(tmp_path, capsys):
    log, results = _serve(tmp_path, canary_tau=-10.0)
    by_arm = {r.rollout_arm for r in results}
    assert by_arm == {"stable", "canary"}
    assert all(r.intervened == (r.rollout_arm == "canary") for r in results)
    records = [json.loads(line) for line in open(log)]
    assert sum(r["kind"] == "decision" for r in records) == len(PROMPTS)  # one per request
    assert main(["rollout", "report", log, "--json"]) == EXIT_CANARY_FLAGGED
    report = json.loads(capsys.readouterr().out)
    rates = {a["arm"]: a["intervention_rate"] for a in report["arms"]}
    assert rates == {"stable": 0.0, "canary": 1.0}
    assert report["decision_records"] is True
    canary = next(a for a in report["arms"] if a["arm"] == "canary")
    assert canary["intervention_ci"][0] > 0.6  # the interval excludes stable's 0 %


def test_a_canary_like_stable_passes(tmp_path, capsys):
    log, _ = _serve(tmp_path, canary_tau=1e6)
    assert main(["rollout", "report", log]) == EXIT_OK
    assert "FLAGGED" not in capsys.readouterr().out


def test_a_log_without_a_stable_baseline_fails_instead_of_passing(tmp_path, capsys):
    log, _ = _serve(tmp_path, canary_tau=-10.0, decision_records=False)
    # Without decision records the quiet stable arm writes nothing at all.
    assert main(["rollout", "report", log]) == EXIT_CANARY_FLAGGED
    out = capsys.readouterr().out
    assert "no stable requests to compare with" in out and "FLAGGED" in out


def test_decision_records_go_only_to_sinks_that_ask_for_them(tmp_path):
    model, tok = tiny("llama")
    plain, records = [], []
    guard = Guardrail(
        model,
        tok,
        random_policy(model, tok, layer=1, tau=1e6),
        sinks=[CallbackSink(plain.append), CallbackSink(records.append, decision_records=True)],
        max_new_tokens=2,
    )
    result = guard.generate("Hello")
    assert plain == []  # nothing happened: no intervention, no refusal
    assert [r.kind for r in records] == ["decision"]
    record = records[0]
    assert (record.request_id, record.intervened, record.score) == (
        result.request_id,
        False,
        result.score,
    )


def test_enforce_without_a_policy_is_an_error_not_unguarded_output(capsys):
    from guardrail import GuardrailError

    model, tok = tiny("llama")
    guard = Guardrail(model, tok)  # enforce by default, nothing attached
    with pytest.raises(GuardrailError, match="mode='off'"):
        guard.generate("Hello", max_new_tokens=2)
    assert guard.generate("Hello", mode="off", max_new_tokens=2).intervened is False
    code = main(["generate", "--model", "tiny-llama", "--prompt", "Hello", "--max-new-tokens", "2"])
    assert code == 1 and "no policy serves this request" in capsys.readouterr().err


def test_a_policy_reference_is_resolved_through_the_registry(tmp_path):
    from guardrail import GuardrailError
    from guardrail.policy.registry import PolicyRegistry

    model, tok = tiny("llama")
    registry = PolicyRegistry(tmp_path)
    for version in ("1.0.0", "1.2.0", "2.0.0"):
        registry.publish(random_policy(model, tok, layer=1, name="p", version=version))
    guard = Guardrail(model, tok, "p@^1.0", registry=registry)
    assert guard.policy.ref == "p@1.2.0"
    with pytest.raises(GuardrailError, match="registry="):
        Guardrail(model, tok, "p@^1.0")


def test_policy_derive_writes_a_new_recorded_version(tmp_path, capsys):
    model, tok = tiny("llama")
    src = random_policy(model, tok, layer=1, name="p", version="1.0.0", tau=0.5)
    src_path = src.save_pretrained(tmp_path / "1.0.0")
    out = tmp_path / "1.1.0"
    code = main(
        [
            "policy",
            "derive",
            str(src_path),
            "--set",
            "tau=0.45",
            "--version",
            "1.1.0",
            "--out",
            str(out),
        ]
    )
    assert code == EXIT_OK
    from guardrail.policy import PolicyBundle

    derived = PolicyBundle.from_pretrained(out)
    assert (derived.version, derived.parameters.tau) == ("1.1.0", 0.45)
    record = derived.manifest.derived_from
    assert record["ref"] == "p@1.0.0" and record["changes"] == {"tau": [0.5, 0.45]}
    assert record["digest"] == PolicyBundle.from_pretrained(src_path).manifest.digest
    assert derived.manifest.created >= PolicyBundle.from_pretrained(src_path).manifest.created
    assert torch_equal(derived.u, src.u)
    capsys.readouterr()
    assert main(["policy", "diff", str(src_path), str(out), "--json"]) == EXIT_OK
    diff = json.loads(capsys.readouterr().out)
    assert diff["parameters"]["to"]["tau"] == 0.45 and "p@1.1.0 derived from" in diff
    # the same version, an unknown or an invalid parameter: errors naming the fix
    for setting, version in (("tau=1", "1.0.0"), ("gate=1", "1.2.0"), ("kappa=1e9", "1.2.0")):
        args = ["policy", "derive", str(src_path), "--set", setting, "--version", version]
        assert main([*args, "--out", str(tmp_path / setting)]) == 1
    err = capsys.readouterr().err
    assert "new version" in err and "unknown steering parameter" in err and "kappa" in err
    assert "Traceback" not in err


def test_policy_derive_sets_and_removes_per_modality_gates(tmp_path, capsys):
    """``--set tau.video=0.3`` gives videos their own gate (``tau_modalities``), merged
    with the source's gates; ``tau.image=none`` removes one; a modality the bundle
    format does not know is an error naming the parameter."""
    model, tok = tiny("llama")
    src = random_policy(
        model, tok, layer=1, name="p", version="1.0.0", tau=0.5, tau_modalities={"image": 0.7}
    )
    src_path = src.save_pretrained(tmp_path / "1.0.0")
    base = ["policy", "derive", str(src_path)]
    out = tmp_path / "1.1.0"
    args = [*base, "--set", "tau.video=0.3", "--version", "1.1.0", "--out", str(out)]
    assert main(args) == EXIT_OK
    from guardrail.policy import PolicyBundle

    derived = PolicyBundle.from_pretrained(out)
    assert derived.parameters.tau_modalities == {"image": 0.7, "video": 0.3}
    assert derived.manifest.derived_from["changes"] == {
        "tau_modalities": [{"image": 0.7}, {"image": 0.7, "video": 0.3}]
    }
    out = tmp_path / "1.2.0"
    args = [*base, "--set", "tau.image=none", "--version", "1.2.0", "--out", str(out)]
    assert main(args) == EXIT_OK
    assert PolicyBundle.from_pretrained(out).parameters.tau_modalities == {}
    capsys.readouterr()
    args = [*base, "--set", "tau.audio=0.3", "--version", "1.3.0"]
    assert main([*args, "--out", str(tmp_path / "1.3.0")]) == 1
    err = capsys.readouterr().err
    assert "tau_modalities" in err and "Traceback" not in err


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_from_pretrained_takes_a_checkout_with_transformers_loading_options(tmp_path):
    import torch

    from guardrail.testing import tiny_model, tiny_policy

    model, processor = tiny_model("llava")
    checkout = tmp_path / "tiny-llava-checkout"
    model.save_pretrained(checkout)
    processor.save_pretrained(checkout)
    policy = tiny_policy(model, processor, tau=-10.0).save_pretrained(tmp_path / "policy")
    guard = Guardrail.from_pretrained(
        str(checkout), policy, device_map="cpu", torch_dtype="bfloat16", max_new_tokens=3
    )
    assert guard.model.dtype == torch.bfloat16 and type(guard.model) is type(model)
    result = guard.generate("Hello")
    assert result.intervened and result.policy_version == "1.0.0"


def test_a_hub_id_goes_to_transformers_and_fails_clearly_offline():
    from guardrail import GuardrailError

    with pytest.raises(GuardrailError, match="hub id"):  # never downloads: cache only
        Guardrail.from_pretrained(
            "some-org/some-model-that-is-not-cached", model_kwargs={"local_files_only": True}
        )
