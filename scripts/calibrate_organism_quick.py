import time, torch
from guardrail import organism, calibrate
from guardrail.calibrate import CalibrationTargets
from guardrail.neutral import NeutralMedia
from guardrail.datasets import load_prompts
from guardrail.report import write_report
t = time.time()
model, proc = organism.load()
H = load_prompts("harmful", split="train")[:120] + load_prompts("harmful", split="val")[:16]
S = load_prompts("harmless", split="train")[:120] + load_prompts("harmless", split="val")[:16]
b = calibrate(model, proc, H, S, layers=[12, 16, 20], name="organism", version="1.0.0",
              media=NeutralMedia(seed=0, image_size=(256, 256), video_frames=3),
              targets=CalibrationTargets(max_validation=16, lam_grid=(2.0, 4.0), kappa_grid=(1.0,)),
              progress=False, description="MARS policy for the model organism (text-only calibration, neutral images/videos)")
b.save_pretrained("policies/organism/1.0.0")
write_report(b, "benchmarks/out/organism-calibration.html")
print(b, time.time() - t)
for r in b.manifest.calibration["sweep"]: print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})
