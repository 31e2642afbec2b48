#!/usr/bin/env bash
# One model trained once, then evaluated and explained under torch and jax, on GPU and on
# CPU: how far do predictions and Grad-CAM maps move between backends and devices?
# Usage (a machine with a GPU, torch and jax; keras installed): scripts/gpu-agreement.sh OUT_DIR
set -euo pipefail
OUT=${1:-runs/gpu-agreement}
PY=${PY:-python3}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY cli.py make-demo-data demo-data --train-per-class 80 --test-per-class 20
KERAS_BACKEND=torch $PY cli.py train --data-dir demo-data --image-size 224 --batch-size 32 --epochs 6 \
  --lr 5e-4 --bn-momentum 0.9 --crop-scale 0.6,1 --weights none --out runs/gpu-run --verbose 2
for backend in torch jax; do
  for device in gpu cpu; do
    if [ "$device" = cpu ]; then hide="CUDA_VISIBLE_DEVICES= JAX_PLATFORMS=cpu"; else hide=""; fi
    echo "== $backend on $device"
    env $hide KERAS_BACKEND=$backend $PY cli.py evaluate runs/gpu-run | grep -E "^Accuracy|^Wrote"
    mv "runs/gpu-run/eval-test-$backend.json" "runs/gpu-run/eval-$backend-$device.json"
    env $hide KERAS_BACKEND=$backend $PY cli.py gradcam runs/gpu-run demo-data/Testing \
      --out "runs/gpu-cam-$backend-$device" | tail -1
  done
done
$PY - "$OUT" <<'PY'
import json, sys, itertools
import numpy as np
out = sys.argv[1]
runs = {}
for b, d in itertools.product(("torch", "jax"), ("gpu", "cpu")):
    report = json.load(open(f"runs/gpu-run/eval-{b}-{d}.json"))
    runs[f"{b}-{d}"] = (np.array([p["probabilities"] for p in report["predictions"]]),
                        np.load(f"runs/gpu-cam-{b}-{d}/heatmaps.npz")["maps"], report["accuracy"])
rows = []
for a, b in itertools.combinations(runs, 2):
    pa, ma, acc_a = runs[a]
    pb, mb, acc_b = runs[b]
    corr = [np.corrcoef(x.ravel(), y.ravel())[0, 1] for x, y in zip(ma, mb)]
    rows.append({"pair": f"{a} vs {b}", "max_prob_diff": float(np.abs(pa - pb).max()),
                 "same_prediction": float((pa.argmax(1) == pb.argmax(1)).mean()),
                 "min_cam_corr": float(np.nanmin(corr)), "accuracy": [acc_a, acc_b]})
    print(rows[-1])
json.dump(rows, open(f"{out}/agreement.json", "w"), indent=2)
PY
