"""Rollouts: configuration files, canary assignment, kill switch, swaps and the event report."""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
from pydantic import ValidationError

from guardrail.adapters import ModelAdapter
from guardrail.cli import EXIT_CANARY_FLAGGED, EXIT_OK, main
from guardrail.errors import PolicyCompatibilityError, PolicyNotFoundError, PolicySignatureError
from guardrail.evaluation.rollout_report import report_events, two_proportion_z
from guardrail.observability.events import InterventionEvent, JsonlSink, RefusalEvent
from guardrail.policy.registry import PolicyRegistry
from guardrail.policy.rollout import Rollout, RolloutConfig, RolloutConfigError, bucket
from guardrail.policy.signing import TrustStore, generate_keypair, sign_bundle

from .conftest import random_policy, tiny


class CountingRegistry(PolicyRegistry):
    """A real local registry that counts bundle loads."""

    loads = 0

    def load(self, ref, **kwargs):
        self.loads += 1
        return super().load(ref, **kwargs)


@pytest.fixture()
def registry(tmp_path, tiny_llama):
    reg = CountingRegistry(tmp_path / "registry")
    for seed, version in enumerate(["1.0.0", "1.1.0", "1.2.0", "2.0.0-rc.1"]):
        reg.publish(random_policy(*tiny_llama, name="guard", version=version, seed=seed))
    return reg


CONFIG = {
    "stable": "guard@~1.0",
    "canary": {"ref": "guard@1.1.0", "share": 0.1, "sticky_key": "user"},
    "shadow": ["guard@2.0.0-rc.1"],
}


# ----------------------------------------------------------------------------- configuration


def test_config_from_json_and_yaml_files(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps(CONFIG))
    (tmp_path / "r.yaml").write_text(
        "stable: guard@~1.0\n"
        "canary:\n  ref: guard@1.1.0\n  share: 0.1\n  sticky_key: user\n"
        "shadow: [guard@2.0.0-rc.1]\n"
    )
    from_json = RolloutConfig.from_file(tmp_path / "r.json")
    from_yaml = RolloutConfig.from_file(tmp_path / "r.yaml")
    assert from_json == from_yaml == RolloutConfig(**CONFIG)
    assert (
        from_yaml.canary.share == 0.1 and from_yaml.kill_switch is False and from_yaml.salt is None
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "stable: a\ncanary: {ref: b, share: 1.5}\n",
            r"canary\.share: .*less than or equal to 1 \(got 1\.5\); use a fraction between 0 and 1",
        ),
        (
            "stable: a\ncanary: {ref: b, share: -0.1}\n",
            r"canary\.share: .*greater than or equal to 0",
        ),
        (
            "stable: a\ncanary: {ref: b, share: 0.1, sticky_key: device}\n",
            r"canary\.sticky_key: .*\(got 'device'\); use 'user', 'session' or 'request'",
        ),
        ("stable: a\ncanary: {ref: b}\n", r"canary\.share: Field required"),
        (
            "stable: a\nkill_swich: true\n",
            r"kill_swich: unknown field; allowed: stable, canary, shadow, kill_switch, salt",
        ),
        ("canary: {ref: b, share: 0.1}\n", r"stable: Field required"),
        ("stable: '  '\n", r"stable: .*must be a registry reference"),
        ("stable: a\nshadow: ['']\n", r"shadow\.0: .*must be a registry reference"),
        ("- stable: a\n", r"must hold a mapping with at least 'stable'"),
        ("stable: [unclosed\n", r"does not parse"),
    ],
)
def test_bad_config_errors_name_field_value_and_fix(tmp_path, text, message):
    path = tmp_path / "rollout.yml"
    path.write_text(text)
    with pytest.raises(RolloutConfigError, match=message) as info:
        RolloutConfig.from_file(path)
    assert str(path) in str(info.value)


def test_bad_config_from_python_is_a_pydantic_error():
    with pytest.raises(ValidationError, match=r"canary\.share\n.*less than or equal to 1"):
        RolloutConfig(stable="a", canary={"ref": "b", "share": 1.5})
    with pytest.raises(RolloutConfigError, match=r"canary\.share"):
        Rollout({"stable": "a", "canary": {"ref": "b", "share": 2}})


def test_unknown_file_suffix_and_missing_file(tmp_path):
    (tmp_path / "r.toml").write_text("stable = 'a'")
    with pytest.raises(RolloutConfigError, match="name the file .json, .yaml or .yml"):
        RolloutConfig.from_file(tmp_path / "r.toml")
    with pytest.raises(RolloutConfigError, match="cannot read rollout config"):
        RolloutConfig.from_file(tmp_path / "missing.yaml")


# ----------------------------------------------------------------------------- assignment


def test_loads_every_bundle_up_front(registry):
    rollout = Rollout(CONFIG, registry)
    assert registry.loads == 3
    assert rollout.stable.ref == "guard@1.0.0"  # ~1.0 stays on 1.0.x
    assert rollout.canary.ref == "guard@1.1.0"
    assert [b.ref for b in rollout.shadows] == ["guard@2.0.0-rc.1"]
    for key in ("a", "b", None):
        rollout.resolve(key)
    assert registry.loads == 3  # resolve() never loads


def test_canary_share_and_stickiness(registry):
    rollout = Rollout(CONFIG, registry)
    keys = [f"user-{i}" for i in range(10_000)]
    first = [rollout.resolve(k) for k in keys]
    canary = sum(a.arm == "canary" for a in first)
    # Binomial(n=10000, p=0.1): sigma = sqrt(n p (1-p)) = 30 keys (0.3 pp); allow 4 sigma = 120
    # keys = +-1.2 percentage points around 10 %.
    sigma = math.sqrt(10_000 * 0.1 * 0.9)
    assert abs(canary - 1_000) <= 4 * sigma, canary
    for a in first:
        assert a.policy is (rollout.canary if a.arm == "canary" else rollout.stable)
        assert [s.ref for s in a.shadows] == ["guard@2.0.0-rc.1"]
        assert (a.arm == "canary") == (a.bucket < 0.1)
    # sticky: the same key always gets the same arm, also in a fresh rollout (another process)
    again = Rollout(CONFIG, registry)
    assert [again.resolve(k).arm for k in keys] == [a.arm for a in first]
    # the bucket is the documented hash of salt (default: the canary ref) and key
    assert first[0].bucket == bucket("guard@1.1.0", "user-0")


def test_raising_the_share_only_moves_keys_to_canary(registry):
    rollout = Rollout(CONFIG, registry)
    keys = [f"s{i}" for i in range(2_000)]
    before = {k for k in keys if rollout.resolve(k).arm == "canary"}
    rollout.set_canary_share(0.5)
    after = {k for k in keys if rollout.resolve(k).arm == "canary"}
    assert before < after
    assert abs(len(after) - 1_000) <= 4 * math.sqrt(2_000 * 0.25)
    rollout.set_canary_share(0.0)
    assert all(rollout.resolve(k).arm == "stable" for k in keys)
    rollout.set_canary_share(1.0)
    assert all(rollout.resolve(k).arm == "canary" for k in keys)
    with pytest.raises(RolloutConfigError, match=r"canary\.share"):
        rollout.set_canary_share(1.5)
    assert rollout.config.canary.share == 1.0  # a rejected change leaves the rollout serving


def test_missing_key_is_assigned_at_random_per_request(registry):
    rollout = Rollout(CONFIG, registry, rng=random.Random(0))
    arms = [rollout.resolve(None).arm for _ in range(2_000)] + [rollout.resolve("").arm]
    canary = arms.count("canary")
    assert abs(canary - 200) <= 4 * math.sqrt(2_000 * 0.1 * 0.9)  # sigma 13.4 requests
    assert all(rollout.resolve(None).bucket is None for _ in range(10))


def test_key_for_follows_sticky_key(registry):
    rollout = Rollout({**CONFIG, "canary": {**CONFIG["canary"], "sticky_key": "session"}}, registry)
    assert rollout.sticky_key == "session"
    assert rollout.key_for(user="u", session="s", request_id="r") == "s"
    assert Rollout({"stable": "guard@1.0.0"}, registry).key_for(user="u") is None


def test_kill_switch(registry):
    rollout = Rollout({**CONFIG, "kill_switch": True}, registry)
    killed = rollout.resolve("user-1")
    assert killed.policy is None and killed.arm == "killed" and killed.shadows == []
    rollout.set_kill_switch(False)
    assert rollout.resolve("user-1").policy is not None


def test_swaps_are_pointer_changes_without_loading(registry):
    rollout = Rollout(CONFIG, registry)
    stable, canary = rollout.stable, rollout.canary
    loads = registry.loads
    shutil.rmtree(registry.root)  # no registry access is possible any more
    rollout.set_kill_switch(True)
    assert rollout.resolve("k").arm == "killed"
    rollout.set_kill_switch(False)
    rollout.set_canary_share(0.3)
    rollout.promote()
    assert rollout.stable is canary and rollout.canary is None
    assert all(rollout.resolve(f"k{i}").policy is canary for i in range(100))
    rollout.rollback()
    assert registry.loads == loads
    assert stable is not canary


def test_update_loads_new_bundles_first_and_keeps_state_on_failure(registry, tiny_llama):
    rollout = Rollout(CONFIG, registry)
    old_stable = rollout.stable
    with pytest.raises(
        PolicyNotFoundError, match=r"rollout canary\.ref 'guard@9\.0\.0': no version"
    ):
        rollout.update({**CONFIG, "canary": {"ref": "guard@9.0.0", "share": 0.5}})
    assert rollout.canary.ref == "guard@1.1.0" and rollout.config.canary.share == 0.1
    registry.publish(random_policy(*tiny_llama, name="guard", version="1.0.1", seed=9))
    loads = registry.loads
    rollout.update(CONFIG)  # ranges resolve again: ~1.0 now selects 1.0.1
    assert rollout.stable.ref == "guard@1.0.1" and rollout.stable is not old_stable
    assert registry.loads == loads + 1  # only the new bundle was loaded


def test_paths_relative_to_the_config_file(tmp_path, registry):
    conf = tmp_path / "conf"
    conf.mkdir()
    shutil.copytree(registry.root / "guard" / "1.2.0", conf / "bundle")
    (conf / "rollout.yaml").write_text(
        "stable: ./bundle\ncanary: {ref: 'guard@1.1.0', share: 0.2}\n"
    )
    rollout = Rollout.from_file(conf / "rollout.yaml", registry)
    assert rollout.stable.ref == "guard@1.2.0" and rollout.canary.ref == "guard@1.1.0"
    with pytest.raises(
        RolloutConfigError, match="registry reference but the rollout has no registry"
    ):
        Rollout.from_file(conf / "rollout.yaml")
    (conf / "rollout.yaml").write_text("stable: ./bundle\nkill_switch: true\n")
    rollout.reload()
    assert rollout.resolve("x").arm == "killed"


def test_trust_store_refuses_unsigned_and_tampered_bundles(registry):
    private, public = generate_keypair()
    trust = TrustStore({"release": public})
    for version in ("1.0.0", "1.1.0", "2.0.0-rc.1"):
        sign_bundle(registry.root / "guard" / version, private, "release")
    assert Rollout(CONFIG, registry, trust_store=trust).canary.ref == "guard@1.1.0"
    with pytest.raises(
        PolicySignatureError, match=r"rollout canary\.ref 'guard@1\.2\.0': .*unsigned"
    ):
        Rollout(
            {**CONFIG, "canary": {"ref": "guard@1.2.0", "share": 0.1}}, registry, trust_store=trust
        )
    signature = registry.root / "guard" / "1.1.0" / "signature.json"
    shutil.copy(registry.root / "guard" / "1.0.0" / "signature.json", signature)
    with pytest.raises(PolicySignatureError, match="different manifest"):
        Rollout(CONFIG, registry, trust_store=trust)


def test_adapter_checks_every_bundle(registry, tiny_llama):
    assert Rollout(CONFIG, registry, adapter=ModelAdapter(*tiny_llama)).stable.ref == "guard@1.0.0"
    with pytest.raises(PolicyCompatibilityError, match="rollout stable 'guard@~1.0'"):
        Rollout(CONFIG, registry, adapter=ModelAdapter(*tiny("llama", seed=1)))


def test_rollout_check_cli(tmp_path, registry, capsys):
    (tmp_path / "r.json").write_text(json.dumps(CONFIG))
    assert (
        main(
            [
                "rollout",
                "check",
                str(tmp_path / "r.json"),
                "--registry",
                str(registry.root),
                "--json",
            ]
        )
        == EXIT_OK
    )
    out = json.loads(capsys.readouterr().out)
    assert (
        out["stable"] == "guard@1.0.0"
        and out["canary"] == "guard@1.1.0"
        and out["canary_share"] == 0.1
    )


# ----------------------------------------------------------------------------- report


def _event(request_id, arm, version, *, intervened=False, refused=False, score=0.0, latency=0.1):
    return {
        "request_id": request_id,
        "policy_name": "guard",
        "policy_version": version,
        "rollout_arm": arm,
        "intervened": intervened,
        "refused": refused,
        "score": score,
        "latency_s": latency,
        "mode": "enforce",
    }


def _write_log(path, canary_interventions):
    """2000 stable requests (5 % intervened, 3 % refused) and 500 canary requests."""
    lines = []
    for i in range(2_000):
        lines.append(
            json.dumps(
                _event(
                    f"s{i}",
                    "stable",
                    "1.0.0",
                    intervened=i % 20 == 0,
                    refused=i % 100 < 3,
                    score=i / 1999,
                    latency=0.1 + i / 19990,
                )
            )
        )
    for i in range(500):
        lines.append(
            json.dumps(
                _event(
                    f"c{i}",
                    "canary",
                    "1.1.0",
                    intervened=i < canary_interventions,
                    refused=i % 100 < 3,
                    score=1.0,
                    latency=0.2,
                )
            )
        )
    # one request logged twice (an intervention event and a refusal event): counted once
    lines.append(json.dumps(_event("c3", "canary", "1.1.0", refused=True, score=1.0, latency=0.3)))
    lines += [
        "not json",
        json.dumps({"request_id": "x", "policy_name": "guard"}),  # fields missing
        json.dumps(_event("y", "stable", "1.0.0") | {"intervened": "yes"}),  # not a boolean
        json.dumps(_event("z", "stable", "1.0.0") | {"latency_s": -1}),
        "",  # blank lines are not malformed
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_report_flags_a_canary_that_intervenes_more(tmp_path):
    report = report_events(
        _write_log(tmp_path / "events.jsonl", canary_interventions=75), tolerance=0.05
    )
    assert report.skipped == 4 and report.lines == 2_505 and report.requests == 2_500
    assert [e.split(":")[0] for e in report.skipped_examples] == [
        "line 2502",
        "line 2503",
        "line 2504",
        "line 2505",
    ]
    stable, canary = report.arms
    assert (stable.arm, stable.policy, stable.requests) == ("stable", "guard@1.0.0", 2_000)
    assert stable.intervention_rate == pytest.approx(0.05) and stable.refusal_rate == pytest.approx(
        0.03
    )
    assert (stable.score_p10, stable.score_p50, stable.score_p90) == pytest.approx((0.1, 0.5, 0.9))
    assert stable.latency_p50 == pytest.approx(0.15, abs=1e-4)
    assert (canary.arm, canary.policy, canary.requests) == ("canary", "guard@1.1.0", 500)
    assert canary.intervention_rate == pytest.approx(0.15)
    assert canary.refusals == 15 + 1  # c3's refusal event merged into its request
    assert canary.latency_p95 == pytest.approx(0.2)
    intervention, refusal = report.comparisons
    assert intervention.metric == "intervention_rate" and intervention.flagged
    assert intervention.difference == pytest.approx(0.10)
    z, p = two_proportion_z(75, 500, 100, 2_000)
    assert (
        intervention.z == pytest.approx(z)
        and intervention.p_value == pytest.approx(p)
        and p < 1e-10
    )
    assert refusal.metric == "refusal_rate" and not refusal.flagged
    assert report.flagged
    text = report.to_text()
    assert "FLAGGED" in text and "4 malformed lines skipped" in text


def test_report_passes_a_similar_canary_and_alpha_gate(tmp_path):
    path = _write_log(tmp_path / "events.jsonl", canary_interventions=25)  # 5 % like stable
    report = report_events(path)
    assert not report.flagged and all(not c.flagged for c in report.comparisons)
    # with a loose tolerance a real difference is flagged only when also significant
    path = _write_log(tmp_path / "events2.jsonl", canary_interventions=40)  # 8 % vs 5 %
    assert report_events(path, tolerance=0.02).flagged
    assert report_events(path, tolerance=0.02, alpha=1e-6).flagged is False


def test_two_proportion_z_textbook_values():
    z, p = two_proportion_z(45, 100, 30, 100)
    assert z == pytest.approx(2.1909, abs=1e-4) and p == pytest.approx(0.02846, abs=1e-4)
    assert two_proportion_z(0, 10, 0, 10) == (0.0, 1.0)


def test_report_reads_the_guardrail_event_sink(tmp_path):
    path = tmp_path / "sink.jsonl"
    sink = JsonlSink(path)
    common = dict(
        policy_name="guard", policy_version="1.1.0", mode="enforce", score=0.9, latency_s=0.2
    )
    sink.emit(
        InterventionEvent(
            request_id="r1", refused=True, intervened=True, rollout_arm="canary", **common
        )
    )
    sink.emit(RefusalEvent(request_id="r1", intervened=True, rollout_arm="canary", **common))
    sink.emit(
        InterventionEvent(
            request_id="r2", refused=False, intervened=True, rollout_arm="stable", **common
        )
    )
    sink.close()
    report = report_events(path)
    assert report.skipped == 0 and report.requests == 2
    assert {(a.arm, a.requests, a.interventions, a.refusals) for a in report.arms} == {
        ("canary", 1, 1, 1),
        ("stable", 1, 1, 0),
    }
    assert any("only intervention/refusal events" in w for w in report.warnings)


def test_rollout_report_cli_exit_codes(tmp_path, capsys):
    flagged = _write_log(tmp_path / "bad.jsonl", canary_interventions=75)
    assert main(["rollout", "report", str(flagged)]) == EXIT_CANARY_FLAGGED == 5
    assert "FLAGGED" in capsys.readouterr().out
    assert main(["rollout", "report", str(flagged), "--tolerance", "0.2", "--json"]) == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert data["flagged"] is False and data["skipped"] == 4 and len(data["arms"]) == 2
    assert main(["rollout", "report", str(tmp_path / "missing.jsonl")]) == 1
    assert "cannot read events file" in capsys.readouterr().err
