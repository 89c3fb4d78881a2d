"""Where vLLM's image activations leave HF's, stage by stage, on the organism.

Builds vLLM's engine in this process (eager, one process) on the organism's vLLM
export, feeds the same pixel values to vLLM's and HF's vision tower, and prints the
relative difference after each stage of the CLIP layer, with a float64 reference for
the MLP. docs/vllm.md ("Known gap: media scores") quotes its output.

    .venv-vllm/bin/python benchmarks/vllm_vision_parity.py
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine (and its model) in-process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import torch  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def first(x: object) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x  # type: ignore[return-value]


def main() -> None:
    from vllm import LLM

    from guardrail.models import organism
    from guardrail.models.export import export_for_vllm
    from guardrail.models.organism import render

    model, processor = organism.load(image_adapters=False)
    out = export_for_vllm(model, processor, Path(tempfile.mkdtemp()) / "organism")
    llm = LLM(str(out), dtype="float32", max_model_len=1024, enforce_eager=True, seed=0)
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    vllm_model = runner.get_model()
    image = render.render_text("How do I build a weapon that can hurt many people?")
    pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"].float()
    hf_tower = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower)
    v_tower = getattr(vllm_model.vision_tower, "vision_model", vllm_model.vision_tower)
    with torch.no_grad():
        emb = hf_tower.embeddings(pixels)
        print(f"patch embeddings      {rel(v_tower.embeddings(pixels), emb):.2e}")
        pre = hf_tower.pre_layrnorm(emb)
        print(f"pre-layernorm         {rel(v_tower.pre_layrnorm(emb), pre):.2e}")
        h_layer, v_layer = hf_tower.encoder.layers[0], v_tower.encoder.layers[0]
        x = h_layer.layer_norm1(pre)
        # (vLLM's encoder attention needs the engine's forward context; it is not run alone.
        # The layer's output differs exactly as much as its MLP's, printed below.)
        h_mlp, v_mlp = h_layer.mlp, v_layer.mlp
        h_fc1, v_fc1 = h_mlp.fc1(x), first(v_mlp.fc1(x))
        ref_fc1 = copy.deepcopy(h_mlp.fc1).double()(x.double())
        print(f"MLP fc1               {rel(v_fc1, h_fc1):.2e}  (vs float64: HF {rel(h_fc1, ref_fc1):.2e}, "
              f"vLLM {rel(v_fc1, ref_fc1):.2e})")
        act = h_mlp.activation_fn(h_fc1)
        print(f"activation            {rel(v_mlp.activation_fn(h_fc1), act):.2e}")
        print(f"MLP fc2 (same input)  {rel(first(v_mlp.fc2(act)), h_mlp.fc2(act)):.2e}")
        h_out, v_out = h_mlp(x), first(v_mlp(x))
        ref_out = copy.deepcopy(h_mlp).double()(x.double())
        print(f"MLP output            {rel(v_out, h_out):.2e}  (vs float64: HF {rel(h_out, ref_out):.2e}, "
              f"vLLM {rel(v_out, ref_out):.2e})")
        print(f"  hidden activation norm {float(h_fc1.norm()):.3g}, MLP output norm {float(h_out.norm()):.3g}")
        h_feat = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
        v_feat = vllm_model.vision_tower(pixels, feature_select_strategy=None)
        print(f"layer (= tower) output{rel(v_feat, h_feat):.2e}")
        proj = model.model.multi_modal_projector(h_feat[:, 1:])
        print(f"projector (same input){rel(vllm_model.multi_modal_projector(h_feat[:, 1:]), proj):.2e}")


if __name__ == "__main__":
    main()
