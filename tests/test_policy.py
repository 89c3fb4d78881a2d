"""Policy bundles: round trip, integrity, compatibility and atomic writes."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import guardrail.policy.bundle as policy_mod
from guardrail.errors import (
    BundleNotFoundError,
    InputError,
    PolicyCompatibilityError,
    PolicyIntegrityError,
)
from guardrail.policy.bundle import MANIFEST, TENSORS, PolicyBundle, _sha256

from .conftest import random_policy, tiny


@pytest.fixture()
def bundle(tiny_llama):
    model, tok = tiny_llama
    return random_policy(model, tok, modalities=("image",), tau=0.4, lam=2.0, kappa=1.5)


def test_round_trip(tmp_path, bundle, tiny_llama):
    path = bundle.save_pretrained(tmp_path / "p")
    loaded = PolicyBundle.from_pretrained(path, model=tiny_llama[0], processor=tiny_llama[1])
    assert loaded.manifest.model_dump(exclude={"digest", "files"}) == bundle.manifest.model_dump(
        exclude={"digest", "files"}
    )
    for key, value in bundle.tensors.items():
        assert torch.equal(loaded.tensors[key], value)
    assert loaded.parameters.tau == 0.4 and loaded.layer == 2
    assert float(loaded.u.norm()) == pytest.approx(1.0, abs=1e-5)
    assert loaded.p_S == pytest.approx(float(loaded.tensors["mu_S"] @ loaded.u), rel=1e-4)


def test_tampered_tensors_rejected(tmp_path, bundle):
    path = bundle.save_pretrained(tmp_path / "p")
    tensors = load_file(path / TENSORS)
    tensors["u"] = -tensors["u"]
    save_file(tensors, path / TENSORS)
    with pytest.raises(PolicyIntegrityError, match="content hash .* does not match"):
        PolicyBundle.from_pretrained(path)


def test_tampered_manifest_rejected(tmp_path, bundle):
    path = bundle.save_pretrained(tmp_path / "p")
    raw = json.loads((path / MANIFEST).read_text())
    raw["parameters"]["tau"] = 99.0
    (path / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(PolicyIntegrityError, match="edited after it was written"):
        PolicyBundle.from_pretrained(path)


def test_invalid_manifest_names_field(tmp_path, bundle):
    path = bundle.save_pretrained(tmp_path / "p")
    raw = json.loads((path / MANIFEST).read_text())
    raw["version"] = "one"
    (path / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(PolicyIntegrityError, match="version: .*semantic version"):
        PolicyBundle.from_pretrained(path)


def test_nan_values_rejected_even_with_matching_hash(tmp_path, bundle):
    path = bundle.save_pretrained(tmp_path / "p")
    tensors = load_file(path / TENSORS)
    tensors["mu_H"][3] = float("nan")
    save_file(tensors, path / TENSORS)
    raw = json.loads((path / MANIFEST).read_text())
    raw["files"][TENSORS] = _sha256((path / TENSORS).read_bytes())
    manifest = policy_mod.Manifest.model_validate(raw).sealed()
    (path / MANIFEST).write_bytes(manifest.canonical_bytes())
    with pytest.raises(PolicyIntegrityError, match="mu_H holds NaN"):
        PolicyBundle.from_pretrained(path)


def test_missing_file_and_not_a_directory(tmp_path, bundle):
    with pytest.raises(BundleNotFoundError, match="not a directory"):
        PolicyBundle.from_pretrained(tmp_path / "nothing")
    path = bundle.save_pretrained(tmp_path / "p")
    (path / TENSORS).unlink()
    with pytest.raises(PolicyIntegrityError, match="missing from the bundle"):
        PolicyBundle.from_pretrained(path)


def test_wrong_model_rejected(tmp_path, bundle):
    path = bundle.save_pretrained(tmp_path / "p")
    other_weights = tiny("llama", seed=1)
    with pytest.raises(PolicyCompatibilityError, match="weights differ"):
        PolicyBundle.from_pretrained(path, model=other_weights[0], processor=other_weights[1])
    other_arch = tiny("llava")
    with pytest.raises(PolicyCompatibilityError, match="calibrated for LlamaForCausalLM"):
        PolicyBundle.from_pretrained(path, model=other_arch[0], processor=other_arch[1])


def test_interrupted_save_keeps_old_bundle(tmp_path, bundle, monkeypatch):
    path = bundle.save_pretrained(tmp_path / "p")
    newer = bundle.with_version("2.0.0").with_parameters(tau=0.9)
    real = policy_mod.write_synced

    def crash(target, data):
        if target.name == MANIFEST:
            raise KeyboardInterrupt("power cut")
        real(target, data)

    monkeypatch.setattr(policy_mod, "write_synced", crash)
    with pytest.raises(KeyboardInterrupt):
        newer.save_pretrained(path)
    monkeypatch.undo()
    survivor = PolicyBundle.from_pretrained(path)
    assert survivor.version == "1.0.0" and survivor.parameters.tau == 0.4
    assert [p.name for p in tmp_path.iterdir()] == ["p"]  # no temporary debris
    newer.save_pretrained(path)
    assert PolicyBundle.from_pretrained(path).version == "2.0.0"


def test_from_statistics_rejects_identical_means(tiny_llama):
    with pytest.raises(PolicyIntegrityError, match="coincide"):
        random_policy(*tiny_llama).from_statistics(
            name="x",
            version="1.0.0",
            layer=1,
            mu_H=torch.ones(64),
            mu_S=torch.ones(64),
            model=random_policy(*tiny_llama).manifest.model,
        )


def test_bad_name_and_parameters_rejected(tiny_llama):
    with pytest.raises(Exception, match="valid policy name"):
        random_policy(*tiny_llama, name="Bad Name")
    with pytest.raises(Exception, match="finite"):
        random_policy(*tiny_llama).with_parameters(tau=float("nan"))


def test_score_positions_are_fixed_at_calibration(tiny_llama):
    """The statistics were taken over ``score_positions`` positions: a copy may not
    score another number of them, and the value must be a positive count."""
    from guardrail.errors import InputError

    bundle = random_policy(*tiny_llama, score_positions=3)
    assert bundle.parameters.score_positions == 3
    assert bundle.with_parameters(tau=0.1).parameters.score_positions == 3
    with pytest.raises(InputError, match="--score-positions 1"):
        bundle.with_parameters(score_positions=1)
    with pytest.raises(Exception, match="score_positions"):
        random_policy(*tiny_llama, score_positions=0)


def test_score_positions_round_trip_and_old_bundles_keep_their_bytes(tmp_path, tiny_llama):
    """k > 1 is saved and read back; k = 1 is not written at all, so bundles written
    before the option existed keep their digest and signature."""
    windowed = random_policy(*tiny_llama, score_positions=4)
    windowed.save_pretrained(tmp_path / "w")
    assert PolicyBundle.from_pretrained(tmp_path / "w").parameters.score_positions == 4
    plain = random_policy(*tiny_llama)
    plain.save_pretrained(tmp_path / "p")
    written = json.loads((tmp_path / "p" / MANIFEST).read_text())
    assert "score_positions" not in written["parameters"]
    assert PolicyBundle.from_pretrained(tmp_path / "p").parameters.score_positions == 1


def test_per_modality_gates_round_trip_and_pick_the_row_gate(tmp_path, tiny_llama):
    """``tau_modalities`` is saved and read back; a row's gate is its media's (the
    lowest when it has several), ``tau`` for text only and for a modality without one;
    empty, it is not written (older bundles keep their bytes); bad values are refused."""
    gated = random_policy(*tiny_llama, tau=0.5, tau_modalities={"image": 0.7, "video": 0.3})
    gated.save_pretrained(tmp_path / "g")
    params = PolicyBundle.from_pretrained(tmp_path / "g").parameters
    assert params.tau_modalities == {"image": 0.7, "video": 0.3}
    assert params.gate([]) == 0.5 and params.gate(["text"]) == 0.5
    assert params.gate(["image"]) == 0.7 and params.gate(["video"]) == 0.3
    assert params.gate(["image", "video"]) == 0.3
    only_image = gated.with_parameters(tau_modalities={"image": 0.7}).parameters
    assert only_image.gate(["video"]) == 0.5 and only_image.gate(["image", "video"]) == 0.5
    plain = random_policy(*tiny_llama)
    plain.save_pretrained(tmp_path / "p")
    written = json.loads((tmp_path / "p" / MANIFEST).read_text())
    assert "tau_modalities" not in written["parameters"]
    with pytest.raises(InputError, match="tau_modalities"):
        plain.with_parameters(tau_modalities={"image": float("nan")})
    with pytest.raises(InputError, match="tau_modalities"):
        plain.with_parameters(tau_modalities={"audio": 0.4})


def test_released_bundles_are_never_rewritten():
    """Every bundle under policies/ is a release recorded in policies/releases.json; a
    recalibration is a new version, so a changed digest fails here (issue 27)."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "policies"
    releases = json.loads((root / "releases.json").read_text())
    found = {}
    for manifest in sorted(root.glob("*/*/manifest.json")):
        bundle = PolicyBundle.from_pretrained(manifest.parent)
        found[bundle.ref] = {
            "manifest_digest": bundle.manifest.digest,
            "tensors": bundle.manifest.files[TENSORS],
        }
        assert manifest.parent.relative_to(root).as_posix() == f"{bundle.name}/{bundle.version}"
    assert found == releases, (
        "a released policy version changed or a bundle is unrecorded; publish a new version "
        "instead of rewriting one, and add it to policies/releases.json"
    )
