#!/usr/bin/env bash
# Kill a training run with SIGKILL after its first epoch, resume it, and compare its final
# weights with an uninterrupted run's, bit for bit (what tests/test_resume.py does, for any
# machine, e.g. a GPU one). Usage: scripts/resume-check.sh BACKEND [extra train options...]
set -uo pipefail
BACKEND=$1; shift
PY=${PY:-python3}
OUT=${OUT_DIR:-runs/resume-check-$BACKEND}
rm -rf "$OUT"; mkdir -p "$OUT"
$PY cli.py make-demo-data "$OUT/data" --train-per-class 16 --test-per-class 4 >/dev/null
ARGS=(--data-dir "$OUT/data" --image-size 64 --batch-size 8 --epochs 3 --weights none --deterministic --verbose 0 "$@")
export KERAS_BACKEND=$BACKEND
$PY cli.py train "${ARGS[@]}" --out "$OUT/whole" > "$OUT/whole.log" 2>&1 || { echo "uninterrupted run failed"; tail -5 "$OUT/whole.log"; exit 1; }
$PY cli.py train "${ARGS[@]}" --out "$OUT/cut" > "$OUT/cut.log" 2>&1 &
pid=$!
until $PY -c "import sys; from training.rundir import checkpoint_state as s; sys.exit(0 if (s('$OUT/cut/last.weights.h5') or {}).get('epoch', 0) >= 1 else 1)" 2>/dev/null; do
  kill -0 $pid 2>/dev/null || { echo "the run ended before it could be killed"; exit 1; }
  sleep 0.2
done
sleep 0.5; kill -9 $pid; wait $pid 2>/dev/null
$PY cli.py train "${ARGS[@]}" --out "$OUT/cut" --resume "$OUT/cut" > "$OUT/resume.log" 2>&1 || { echo "resume failed"; tail -5 "$OUT/resume.log"; exit 1; }
$PY - "$OUT" <<'PY'
import csv, io, sys, zipfile
import h5py, numpy as np
out = sys.argv[1]
def arrays(run):
    with zipfile.ZipFile(f"{out}/{run}/model.keras") as z, h5py.File(io.BytesIO(z.read("model.weights.h5"))) as f:
        found = {}
        f.visititems(lambda n, o: found.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
        return found
a, b = arrays("whole"), arrays("cut")
same = [k for k in a if np.array_equal(a[k], b[k])]
worst = max((float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a if a[k].dtype.kind == "f"), default=0.0)
rows = [r["epoch"] for r in csv.DictReader(open(f"{out}/cut/history.csv"))]
print(f"{len(same)} of {len(a)} tensors bit-identical; largest difference {worst:.3g}; history epochs {rows}")
PY
