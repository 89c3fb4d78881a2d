"""Calibration on tiny random MLLMs: bundles, activations, memory, report and CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from guardrail import Guardrail, cli
from guardrail.adapters import ModelAdapter
from guardrail.calibration.calibrate import (
    CalibrationTargets,
    calibrate,
    candidate_layers,
    collect_last_position,
)
from guardrail.calibration.neutral import NeutralMedia
from guardrail.calibration.report import render_report
from guardrail.datasets import load_prompts
from guardrail.errors import InputError
from guardrail.messages import parse_conversation
from guardrail.policy import PolicyBundle
from guardrail.steering import last_positions

from .conftest import tiny

SMALL = CalibrationTargets(max_validation=8, lam_grid=(1.0, 2.0), kappa_grid=(0.5, 1.0))


def _subset(name: str, n_train: int, n_val: int):
    train = load_prompts(name, split="train")[:n_train]
    val = load_prompts(name, split="val")[:n_val]
    return train + val


@pytest.fixture(scope="module")
def calibrated():
    """Bundles for a tiny LLaVA (image) and a tiny Qwen2-VL (image and video)."""
    out = {}
    for arch in ("llava", "qwen2_vl"):
        model, processor = tiny(arch)
        out[arch] = calibrate(
            model,
            processor,
            _subset("harmful", 24, 8),
            _subset("harmless", 24, 8),
            targets=SMALL,
            media=NeutralMedia(seed=3, image_size=(32, 32)),
            progress=False,
            name=f"tiny-{arch.replace('_', '-')}",
            batch_size=8,
        )
    return out


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_calibrated_bundle_loads_and_guards(arch, calibrated, tmp_path):
    model, processor = tiny(arch)
    bundle = calibrated[arch]
    adapter = ModelAdapter(model, processor)
    assert set(bundle.modalities) == set(adapter.modalities)
    assert bundle.layer in candidate_layers(adapter.num_layers, SMALL.layer_range)
    record = bundle.manifest.calibration
    assert record["chosen"]["layer"] == bundle.layer
    assert {r["layer"] for r in record["sweep"]} == set(record["candidate_layers"])
    assert record["datasets"]["harmful_train"]["size"] == 24
    assert len(record["validation_scores"]["harmful"]) == 8
    path = bundle.save_pretrained(tmp_path / arch)
    loaded = PolicyBundle.from_pretrained(path, model=model, processor=processor)
    assert torch.equal(loaded.u, bundle.u)
    guard = Guardrail(model, processor, path)
    result = guard.generate(
        [
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "image": __import__("PIL.Image").Image.new("RGB", (32, 32), "red"),
                    },
                    {"type": "text", "text": "What is this?"},
                ],
            }
        ],
        max_new_tokens=3,
    )
    assert result.policy_version == "1.0.0" and result.score is not None
    # verify through the CLI: success, then tamper -> integrity exit code
    assert cli.main(["policy", "verify", str(path)]) == cli.EXIT_OK
    (path / "tensors.safetensors").write_bytes(b"\0" * 64)
    assert cli.main(["policy", "verify", str(path)]) == cli.EXIT_INTEGRITY


def test_means_match_definitions(calibrated):
    """mu_H, mu_S, deltas and the direction follow the method's definitions."""
    bundle = calibrated["qwen2_vl"]
    t = bundle.tensors
    r = t["mu_H"].double() - t["mu_S"].double()
    assert torch.allclose(t["u"].double(), r / r.norm(), atol=1e-6)
    assert bundle.g == pytest.approx(float(r.norm()), rel=1e-5)
    assert bundle.p_S == pytest.approx(
        float(t["mu_S"].double() @ t["u"].double()), rel=1e-4, abs=1e-6
    )
    assert set(bundle.modalities) == {"image", "video"}


def test_collected_activations_equal_output_hidden_states():
    model, processor = tiny("qwen2_vl")
    adapter = ModelAdapter(model, processor)
    from PIL import Image

    convs = [
        parse_conversation(c)
        for c in (
            "How do I bake bread?",
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": Image.new("RGB", (32, 32), "blue")},
                        {"type": "text", "text": "Describe it"},
                    ],
                }
            ],
        )
    ]
    inputs = adapter.build_inputs(convs)
    layers = [1, 2]
    captured = collect_last_position(adapter, inputs, layers)
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    rows, pos = torch.arange(2), last_positions(inputs["attention_mask"])
    for layer in layers:
        assert torch.equal(captured[layer], hidden[layer][rows, pos].double())


def test_calibration_memory_does_not_grow_with_prompt_count(tmp_path):
    """Peak RSS of streaming collection for 1,000 prompts is within 10 % of that for 100."""
    script = textwrap.dedent("""
        import resource, sys, torch
        torch.set_num_threads(1)
        from guardrail.testing import tiny_model
        from guardrail.adapters import ModelAdapter
        from guardrail.calibration.calibrate import accumulate_means
        from guardrail.messages import parse_conversation
        n = int(sys.argv[1])
        model, tok = tiny_model("llama", num_layers=2)
        adapter = ModelAdapter(model, tok)
        convs = (parse_conversation(f"Write a short note number {i} about gardening in spring.") for i in range(n))
        means = accumulate_means(adapter, convs, [1], batch_size=16)
        assert means[1].dtype == torch.float64
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    peaks = {}
    for n in (100, 1000):
        out = subprocess.run(
            [sys.executable, "-c", script, str(n)], capture_output=True, text=True, check=True
        )
        peaks[n] = int(out.stdout.strip().splitlines()[-1])
    assert peaks[1000] <= peaks[100] * 1.10, peaks


def test_report_has_plots_and_numbers(calibrated, tmp_path):
    bundle = calibrated["qwen2_vl"]
    page = render_report(bundle)
    assert page.count("data:image/png;base64,") == 2
    record = bundle.manifest.calibration
    assert f"<td>layer l*</td><td>{bundle.layer}</td>" in page
    assert f"{bundle.parameters.tau:.4g}" in page
    assert page.count('<tr class="chosen">') == 1
    assert "image: before / after re-centring" not in page  # titles live in the PNG, not the HTML
    for row in record["sweep"]:
        assert f"<td>{row['layer']}</td>" in page


def test_cli_calibrate_writes_bundle_and_report(tmp_path, capsys):
    harmful = tmp_path / "harmful.txt"
    harmless = tmp_path / "harmless.csv"
    harmful.write_text("\n".join(p.prompt for p in load_prompts("harmful")[:30]))
    harmless.write_text(
        "prompt\n" + "\n".join(f'"{p.prompt}"' for p in load_prompts("harmless")[:30])
    )
    out, report = tmp_path / "bundle", tmp_path / "report.html"
    code = cli.main(
        [
            "calibrate",
            "--model",
            "tiny-llava",
            "--harmful",
            str(harmful),
            "--harmless",
            str(harmless),
            "--out",
            str(out),
            "--name",
            "cli-test",
            "--version",
            "0.2.0",
            "--report",
            str(report),
            "--max-validation",
            "6",
            "--image-size",
            "32",
            "--recenter-activation",
            "steered",
            "--quiet",
            "--json",
        ]
    )
    assert code == cli.EXIT_OK
    summary = json.loads(capsys.readouterr().out)
    assert summary["policy"] == "cli-test@0.2.0"
    written = PolicyBundle.from_pretrained(out)
    assert written.version == "0.2.0"
    assert written.parameters.apply_recentering_to_activation == "steered"
    assert written.manifest.calibration["targets"]["apply_recentering_to_activation"] == "steered"
    assert report.read_text().count("data:image/png;base64,") == 2
    assert cli.main(["policy", "show", str(out), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["layer"] == summary["layer"]
    assert cli.main(["policy", "diff", str(out), str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["direction_cosine"] == pytest.approx(1.0)


def test_bad_calibration_input_is_named():
    from guardrail.errors import InputError

    model, processor = tiny("llama")
    with pytest.raises(InputError, match="does not support"):
        calibrate(model, processor, ["a"] * 4, ["b"] * 4, modalities=["image"], progress=False)
    with pytest.raises(InputError, match="out of range"):
        calibrate(model, processor, ["a"] * 4, ["b"] * 4, layers=[99], progress=False)
    bad = CalibrationTargets(apply_recentering_to_activation="always")
    with pytest.raises(
        InputError,
        match=r"apply_recentering_to_activation='always' is not valid: use one of \(False, 'steered', True\)",
    ):
        calibrate(model, processor, ["a"] * 4, ["b"] * 4, targets=bad, progress=False)
    with pytest.raises(
        InputError,
        match=r"recenter='center' is not valid: use one of \('full', 'projection', 'none'\)",
    ):
        calibrate(
            model,
            processor,
            ["a"] * 4,
            ["b"] * 4,
            targets=CalibrationTargets(recenter="center"),
            progress=False,
        )


def test_window_statistics_over_the_last_k_positions():
    """``score_positions=k`` collects the mean of the last k positions (float64), and a
    bundle calibrated that way records k and scores the same window when it guards."""
    model, processor = tiny("llava")
    adapter = ModelAdapter(model, processor)
    convs = [parse_conversation(c) for c in ("How do I bake bread?", "Hi there")]
    inputs = adapter.build_inputs(convs)
    captured = collect_last_position(adapter, inputs, [1, 2], score_positions=3)
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    pos = last_positions(inputs["attention_mask"])
    for layer in (1, 2):
        for row in range(2):
            window = hidden[layer][row, pos[row] - 2 : pos[row] + 1].double().mean(0)
            assert torch.allclose(captured[layer][row], window, atol=1e-12)

    bundle = calibrate(
        model,
        processor,
        _subset("harmful", 12, 6),
        _subset("harmless", 12, 6),
        targets=CalibrationTargets(
            max_validation=6, lam_grid=(1.0,), kappa_grid=(1.0,), score_positions=3
        ),
        media=NeutralMedia(seed=3, image_size=(32, 32)),
        progress=False,
        layers=[1, 2],
    )
    assert bundle.parameters.score_positions == 3
    assert bundle.manifest.calibration["targets"]["score_positions"] == 3
    result = Guardrail(model, processor, bundle).generate("How do I bake bread?", max_new_tokens=2)
    assert result.score is not None
    with pytest.raises(InputError, match="score_positions"):
        calibrate(
            model,
            processor,
            ["a", "b"],
            ["c", "d"],
            targets=CalibrationTargets(score_positions=0),
            progress=False,
        )


def test_validation_subset_is_spread_over_the_split():
    """``max_validation`` keeps prompts evenly spaced over the validation split, not its
    first ones: the shipped files are grouped by category, so a head would miss whole
    categories (near-miss prompts among them)."""
    import random

    from guardrail.calibration.calibrate import _split
    from guardrail.datasets import spread

    prompts = load_prompts("harmless")
    val = [p for p in prompts if p.split == "val"]
    train, picked = _split(prompts, 0.25, random.Random(0), 24)
    assert len(picked) == 24 and picked == spread(val, 24)
    assert all(p.split == "train" for p in train)
    head = {p.category for p in val[:24]}  # 6 of the split's 16 categories, no near-miss
    assert len({p.category for p in picked}) > len(head)
    share = sum(p.category == "near_miss" for p in val) / len(val)
    assert abs(sum(p.category == "near_miss" for p in picked) / 24 - share) < 0.05


def test_candidate_layers_leave_out_the_last_fifth():
    """The default range keeps ``0.2 L <= l < 0.8 L``: of 30 layers (the organism's
    language model) 6 to 23, since layers 24-29 are the last 20 %; where 0.8 L is not a
    whole number the boundary layer below it stays in."""
    assert candidate_layers(30, (0.2, 0.8)) == list(range(6, 24))
    assert candidate_layers(32, (0.2, 0.8)) == list(range(7, 26))  # 25.6: 26-31 left out
    assert candidate_layers(4, (0.2, 0.8)) == [1, 2, 3]
    assert candidate_layers(10, (0.0, 1.0)) == list(range(10))
    with pytest.raises(InputError, match="selects no layer"):
        candidate_layers(2, (0.6, 0.7))


def _drawn_setting():
    """A tiny LLaVA, a typographic renderer of the calibration layouts and small
    harmful / harmless sets (12 train, 8 validation prompts each)."""
    from guardrail.calibration.typography import TypographicRenderer
    from guardrail.evaluation.rendering import PhrasedRenderer

    model, processor = tiny("llava")
    drawn = PhrasedRenderer(
        TypographicRenderer(size=(32, 32), font_size=6), templates="calibration"
    )
    return model, processor, drawn, _subset("harmful", 12, 8), _subset("harmless", 12, 8)


def test_drawn_harmless_prompts_average_into_the_offset_and_join_the_gate():
    """calibrate(drawn=...): the harmless train prompts drawn as images are a second
    harmless image set; the image offset is the mean of the neutral and the drawn
    set's offsets, and the drawn validation prompts are scored for the gate."""
    from guardrail.calibration.calibrate import accumulate_means

    model, processor, drawn, harmful, harmless = _drawn_setting()
    common = dict(
        layers=[1],
        targets=SMALL,
        media=NeutralMedia(seed=3, image_size=(32, 32)),
        progress=False,
        batch_size=8,
    )
    plain = calibrate(model, processor, harmful, harmless, **common)
    both = calibrate(model, processor, harmful, harmless, drawn=drawn, **common)
    adapter = ModelAdapter(model, processor)
    train = [p.prompt for p in harmless if p.split == "train"]
    drawn_mean = accumulate_means(
        adapter,
        (parse_conversation([{"role": "user", "content": drawn.image(p)}]) for p in train),
        [1],
    )[1]
    mu_S = plain.tensors["mu_S"].double()
    expected = (plain.delta("image").double() + (drawn_mean - mu_S)) / 2
    assert torch.allclose(both.delta("image").double(), expected, atol=1e-5)
    assert not torch.allclose(both.delta("image"), plain.delta("image"), atol=1e-4)
    record = both.manifest.calibration
    assert (
        "templates='calibration'" in record["drawn"] and plain.manifest.calibration["drawn"] is None
    )
    assert len(record["validation_scores"]["image+drawn"]) == 8
    assert "kl_image+drawn" in record["grid"][0]  # the drawn set is a benign set of the objective


def test_per_modality_gates_come_from_each_modality_s_benign_sets(tmp_path):
    """CalibrationTargets(per_modality_gates=True): text rows are gated at the harmless
    text set's quantile, images at the highest quantile of their own benign sets
    (neutral and drawn images); the shared gate is the highest of all of them."""
    import dataclasses

    from guardrail.calibration.metrics import quantile

    model, processor, drawn, harmful, harmless = _drawn_setting()
    common = dict(
        layers=[1],
        media=NeutralMedia(seed=3, image_size=(32, 32)),
        drawn=drawn,
        progress=False,
        batch_size=8,
    )
    shared = calibrate(model, processor, harmful, harmless, targets=SMALL, **common)
    split = calibrate(
        model,
        processor,
        harmful,
        harmless,
        targets=dataclasses.replace(SMALL, per_modality_gates=True),
        **common,
    )
    scores = split.manifest.calibration["validation_scores"]
    q = {name: quantile(scores[name], 1 - SMALL.benign_trigger_rate) for name in scores}
    text = q["harmless"]
    media = {m: max(q[m], q[f"{m}+drawn"]) for m in ("image", "video")}
    assert text != pytest.approx(media["image"], abs=1e-3)  # the gates differ on this model
    assert split.parameters.tau == pytest.approx(text, rel=1e-6)
    assert split.parameters.tau_modalities == pytest.approx(media, rel=1e-6)
    assert split.manifest.calibration["chosen"]["tau_modalities"] == split.parameters.tau_modalities
    assert shared.parameters.tau == pytest.approx(max(text, *media.values()), rel=1e-6)
    assert shared.parameters.tau_modalities == {}
    # the bundle gates each row at its modality's gate, and round-trips
    split.save_pretrained(tmp_path / "p")
    loaded = PolicyBundle.from_pretrained(tmp_path / "p").parameters
    assert loaded.gate(["image"]) == pytest.approx(media["image"])
    assert loaded.gate([]) == pytest.approx(text)
    assert "image gate" in render_report(split)  # the report names the media gates
