#!/usr/bin/env bash
# The GPU check, in one call of under 8 minutes: training speed of keras-torch and keras-jax
# against native torchvision at 224 px in float32 and bfloat16 (`bench-train`), how the input
# pipeline scales with workers (`bench-pipeline`), torch/jax parity at 224 px, and a 2-epoch
# demo training run. Everything lands in OUT (default runs/gpu-bench): one JSON per measurement,
# the log, the card and versions (environment.txt) and a summary table (gpu-bench.md).
#
# Usage:
#   scripts/gpu-bench.sh --fetch-wheels   # here, with the network: keras and what it needs that the GPU
#                                         # machine lacks, as Python 3.12 wheels in .whl/ (git-ignored)
#   scripts/gpu-bench.sh [OUT]            # on the GPU machine (torch and jax installed; tensorflow not needed)
#   scripts/gpu-bench.sh --dry-run [OUT]  # the same steps on a CPU, tiny (one precision per backend):
#                                         # checks the script, measures nothing
# Environment: PY (python, default python3), BATCH (default 128), STEPS ("warmup window windows",
# default "5 10 3").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export KERAS_BACKEND=${KERAS_BACKEND:-torch}  # for the steps that name none; tensorflow may be absent

if [ "${1:-}" = "--fetch-wheels" ]; then
  # The GPU machine's image has torch, jax, numpy, h5py, ml-dtypes, rich, absl-py, click and
  # pillow (device README); keras 3.15.1 also needs namex and optree.
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  for pkg in keras==3.15.1 namex optree; do
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl "$pkg"
  done
  ls .whl
  exit 0
fi

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:-runs/gpu-bench}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1

if [ -d .whl ] && ! $PY -c "import keras" 2>/dev/null; then  # keras comes as carried wheels
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if [ $DRY = 1 ]; then
  SIZE=32; BATCH=4; read -r WARMUP WINDOW WINDOWS <<< "1 1 2"; WORKERS=1,2; TRAIN_PER_CLASS=12; EPOCHS_SIZE=32
else
  SIZE=224; BATCH=${BATCH:-128}; read -r WARMUP WINDOW WINDOWS <<< "${STEPS:-5 10 3}"
  WORKERS=1,2,4,8,16; EPOCHS_SIZE=224
  TRAIN_PER_CLASS=$(( (WARMUP + WINDOW * WINDOWS) * BATCH / 4 + 1 ))
fi

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU (nvidia-smi absent)"
  echo "cpu cores: $(nproc)"
  $PY -c "import sys, importlib.metadata as m; print('python', sys.version.split()[0]); [print(p, m.version(p)) for p in ('keras', 'torch', 'torchvision', 'jax', 'jaxlib', 'numpy', 'pillow')]"
} | tee "$OUT/environment.txt"

DATA=$OUT/demo-data
rm -rf "$DATA"
$PY cli.py make-demo-data "$DATA" --train-per-class "$TRAIN_PER_CLASS" --test-per-class 8

step() { echo; echo "== $* ($(date -u +%H:%M:%S))"; }
bench() {  # backend precision [extra options]: one bench-train, its JSON in OUT
  local backend=$1 precision=$2; shift 2
  step "bench-train $backend $precision $*"
  KERAS_BACKEND=$backend $PY cli.py bench-train --data-dir "$DATA" --image-size $SIZE --batch-size "$BATCH" \
    --precision "$precision" --warmup-steps "$WARMUP" --window-steps "$WINDOW" --windows "$WINDOWS" \
    --workers "$(( $(nproc) < 16 ? $(nproc) : 16 ))" --out "$OUT/bench-$backend-$precision.json" "$@" \
    || echo "bench-train $backend $precision failed"
}

# Native torchvision is timed beside keras-torch only (the same figure would come again with jax).
# The dry run checks each command once (one precision per backend), not every figure.
if [ $DRY = 1 ]; then
  bench torch float32
  bench jax mixed_bfloat16 --no-native
else
  bench torch float32
  bench torch mixed_bfloat16
  bench jax float32 --no-native
  bench jax mixed_bfloat16 --no-native
fi

step "bench-pipeline --workers $WORKERS"
$PY cli.py bench-pipeline --data-dir "$DATA" --image-size $SIZE --workers "$WORKERS" --no-baseline \
  | tee "$OUT/pipeline.md" || echo "bench-pipeline failed"

step "parity torch,jax at $SIZE px"
$PY cli.py parity --backends torch,jax --data-dir "$DATA" --image-size $SIZE --out "$OUT/parity" \
  || echo "parity failed"

step "2-epoch demo train (torch)"
KERAS_BACKEND=torch $PY cli.py train --data-dir "$DATA" --image-size $EPOCHS_SIZE --batch-size 32 --epochs 2 \
  --weights none --lr 5e-4 --bn-momentum 0.9 --verbose 2 --out "$OUT/train-torch" --overwrite \
  || echo "train failed"

step "summary"
$PY - "$OUT" <<'PY' | tee "$OUT/gpu-bench.md"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
rows = []
for path in sorted(out.glob("bench-*.json")):
    report = json.loads(path.read_text())
    s = report["settings"]
    for mode, r in report["results"].items():
        rate = "-" if "error" in r else f"{r['images_per_second']:.0f}"
        memory = "-" if "error" in r else f"{r['peak_memory_mb']:.0f}"
        rows.append(f"| {report['backend']} | {s['precision']} | {mode} | {rate} | {memory} |")
print("| backend | precision | measured | images/s | peak memory (MiB) |\n|---|---|---|---|---|")
print("\n".join(rows))
parity = out / "parity" / "parity.md"
if parity.exists():
    print("\n" + parity.read_text())
metrics = out / "train-torch" / "metrics.json"
if metrics.exists():
    m = json.loads(metrics.read_text())
    print(f"\n2-epoch demo train (torch): test accuracy {m['test']['accuracy']:.4f}, "
          f"{m['train_images_per_second']:.0f} img/s, {m['seconds_per_epoch']:.1f} s/epoch")
PY
echo "wrote $OUT"
