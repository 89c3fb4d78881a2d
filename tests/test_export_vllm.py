"""``guardrail export-vllm`` and ``export_for_vllm``: the checkpoint vLLM loads.

vLLM itself is tested in its own venv (integrations/vllm/tests, ``make test-vllm``);
here the directory is checked against what vLLM's LLaVA reads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from guardrail.cli import main
from guardrail.errors import InputError, UnsupportedModelError
from guardrail.models.export import export_for_vllm, vllm_key
from guardrail.testing import cached_tiny_model


def test_vllm_key_renames_the_llava_vision_tower_once():
    assert vllm_key("llava", "vision_tower.encoder.layers.0.mlp.fc1.weight") == (
        "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    )
    already = "vision_tower.vision_model.embeddings.patch_embedding.weight"
    assert vllm_key("llava", already) == already
    assert vllm_key("llama", "vision_tower.x") == "vision_tower.x"
    assert vllm_key("llava", "language_model.model.layers.0.mlp.up_proj.weight").startswith(
        "language_model."
    )


def test_cli_writes_the_weights_bit_for_bit_under_vllm_names(tmp_path, capsys):
    out = tmp_path / "llava-vllm"
    assert main(["export-vllm", "--model", "tiny-llava", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model_type"] == "llava" and "config.json" in report["files"]
    saved = {}
    for shard in out.glob("*.safetensors"):
        saved.update(load_file(shard))
    model, _ = cached_tiny_model("llava")
    state = model.state_dict()
    vision = [k for k in saved if k.startswith("vision_tower.")]
    assert vision and all(k.startswith("vision_tower.vision_model.") for k in vision)
    assert (out / "tokenizer_config.json").is_file() or (out / "tokenizer.json").is_file()
    # every saved tensor is the model's own, bit for bit, under its vLLM name
    by_vllm_name = {}
    for key, value in state.items():
        saved_key = key.removeprefix("model.")  # transformers 5 saves without the wrapper
        by_vllm_name[vllm_key("llava", saved_key)] = value
    matched = 0
    for key, value in saved.items():
        if key in by_vllm_name:
            assert torch.equal(value, by_vllm_name[key]), key
            matched += 1
    assert matched > len(saved) // 2


def test_an_existing_directory_is_refused_before_the_model_loads(tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(["export-vllm", "--model", "no-such-model", str(out), "--json"])
    error = json.loads(capsys.readouterr().out)
    assert code != 0 and "--overwrite" in error["error"]["message"]
    assert (out / "keep.txt").read_text() == "mine"


def test_unmerged_adapters_are_refused_and_nothing_is_written(tmp_path):
    model, processor = cached_tiny_model("llava")

    class Adapter(torch.nn.Module):
        lora_A = None

    model.add_module("extra_adapter", Adapter())
    try:
        with pytest.raises(UnsupportedModelError, match="unmerged adapter"):
            export_for_vllm(model, processor, tmp_path / "out")
    finally:
        del model.extra_adapter
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="exists"):
        export_for_vllm(model, processor, tmp_path)
