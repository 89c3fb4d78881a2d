#!/usr/bin/env bash
# Recalibrates the organism's policy from text-only prompt sets and neutral
# images/videos (256 px, the organism's image size; 3-frame videos), as a NEW version:
#   VERSION=1.1.0 scripts/calibrate_organism.sh
# (released versions are immutable; policies/organism/1.0.0 was made by these settings).
# 48 validation prompts per set, evenly spaced over the validation split; the gate
# opens on at most 5 % of them per benign set (on 48 prompts a 2 % rate is the
# second-highest benign score: one or two prompts would set the gate).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/guardrail calibrate --model organism --harmful harmful --harmless harmless \
    --name organism --version "${VERSION:?set VERSION to the new version, e.g. VERSION=1.1.0}" \
    --out "policies/organism/${VERSION}" \
    --image-size 256 --video-frames 3 --max-validation 48 --trigger-rate 0.05 \
    --batch-size 8 --seed 0 \
    --layers 8,10,12,14,16,18,20,22 --lam-grid 8,16,32,64 --kappa-grid 1,1.5,2,3 \
    --recenter-activation steered \
    --report "${REPORT:-benchmarks/out/organism-calibration.html}" "$@"
