"""Throughput of the training input pipeline against a tf.data baseline doing the same work.

Each side runs in its own process (so peak memory is its own) over the same
Training images: decode, resize to `image_size`, augment (ours: random resized
crop, flip, rotation; baseline: Keras RandomFlip, RandomRotation, RandomZoom
layers in a parallel `map`), normalize (caffe), batch, prefetch. The files are
read once beforehand, so both sides start with the OS file cache warm; epoch 1
is then "cold" for our decoded-image cache (every JPEG decoded), epoch 2 warm.
The baseline has no decoded cache: every epoch decodes.

The entry point is `python cli.py bench-pipeline`; it lives in `bench/`, not in the
framework-neutral `data/`, because its baseline imports tensorflow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from backend.devices import peak_memory_mb  # stdlib only: no framework in this parent
from markdown_tables import markdown_table


def _timed_epochs(iterate_epoch, epochs: int) -> list[dict]:
    results = []
    for epoch in range(epochs):
        start = time.perf_counter()
        images = sum(int(batch_images.shape[0]) for batch_images in iterate_epoch(epoch))
        seconds = time.perf_counter() - start
        results.append({"epoch": epoch + 1, "images": images, "seconds": seconds, "images_per_second": images / seconds})
    return results


def run_ours(data_dir: str, image_size: int, batch_size: int, epochs: int, workers: int) -> list[dict]:
    from data.augment import AugmentConfig
    from data.discovery import discover
    from data.loader import DecodedCache, MRIBatches, iterate_epoch

    _, examples, _, _ = discover(data_dir)
    batches = MRIBatches(
        examples, image_size, batch_size, "caffe", AugmentConfig(), shuffle=True,
        cache=DecodedCache(), workers=workers,
    )
    return _timed_epochs(lambda e: (x for x, _ in iterate_epoch(batches, e)), epochs)


def run_tfdata(data_dir: str, image_size: int, batch_size: int, epochs: int, workers: int) -> list[dict]:
    import keras
    import tensorflow as tf

    dataset = keras.utils.image_dataset_from_directory(
        Path(data_dir) / "Training", image_size=(image_size, image_size), batch_size=batch_size,
        shuffle=True, seed=0, verbose=False,
    )
    augment = keras.layers.Pipeline([
        keras.layers.RandomFlip("horizontal", seed=0),
        keras.layers.RandomRotation(10 / 360, fill_mode="constant", seed=0),
        keras.layers.RandomZoom((-0.3, 0.0), seed=0),
    ])
    preprocess = keras.applications.resnet50.preprocess_input

    def transform(x, y):
        return preprocess(augment(x, training=True)), y

    dataset = dataset.map(transform, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    return _timed_epochs(lambda e: (x for x, _ in dataset.as_numpy_iterator()), epochs)


def measure(side: str, data_dir: str, image_size: int, batch_size: int, epochs: int, workers: int) -> dict:
    """Runs one side in a fresh process and returns its epochs and peak memory."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if side == "tfdata":
        env["KERAS_BACKEND"] = "tensorflow"  # The baseline is the tf.data path.
    request = json.dumps({"side": side, "data_dir": data_dir, "image_size": image_size,
                          "batch_size": batch_size, "epochs": epochs, "workers": workers})
    # The child gets its arguments as one JSON string: no second command line to keep in step.
    code = "import sys; from bench.pipeline import run_side; run_side(sys.argv[1])"
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", code, request], capture_output=True, text=True, env=env,
                            cwd=root, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark side {side!r} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_side(request: str) -> None:
    """In the child process: runs the side `request` (JSON, from `measure`) names and prints
    its result as one JSON line."""
    args = json.loads(request)
    run = run_ours if args["side"] == "ours" else run_tfdata
    epochs = run(args["data_dir"], args["image_size"], args["batch_size"], args["epochs"], args["workers"])
    print(json.dumps({"side": args["side"], "epochs": epochs, "peak_memory_mb": peak_memory_mb()}))


def warm_file_cache(data_dir: str) -> int:
    """Reads every file once so that neither side pays for a cold disk."""
    total = 0
    for path in sorted(Path(data_dir, "Training").rglob("*")):
        if path.is_file():
            total += len(path.read_bytes())
    return total


def format_report(ours: dict, baseline: dict) -> str:
    rows = [[name, f"{r['epochs'][0]['images_per_second']:.0f}", f"{r['epochs'][-1]['images_per_second']:.0f}",
             f"{r['peak_memory_mb']:.0f}"]
            for name, r in (("ours (PyDataset, NumPy/Pillow)", ours), ("tf.data + keras layers", baseline))]
    lines = [markdown_table(["pipeline", "epoch 1 (cold) img/s", "epoch 2 (warm) img/s", "peak memory MiB"], rows)]
    cold = ours["epochs"][0]["images_per_second"] / baseline["epochs"][0]["images_per_second"]
    warm = ours["epochs"][-1]["images_per_second"] / baseline["epochs"][-1]["images_per_second"]
    lines.append("")
    lines.append(f"speed-up over the baseline: cold {cold:.2f}x (goal >= 1x), warm {warm:.2f}x (goal >= 2x)")
    return "\n".join(lines)


def format_scaling(by_workers: dict[int, dict], cpu_count: int | None) -> str:
    """Our pipeline's throughput per worker count, and its speed-up over the fewest workers (a
    thread pool held back by the GIL would stay near 1x; decoding and resampling in Pillow and
    NumPy release it)."""
    fewest = min(by_workers)
    base = by_workers[fewest]["epochs"]
    rows = []
    for workers, result in sorted(by_workers.items()):
        cold, warm = result["epochs"][0]["images_per_second"], result["epochs"][-1]["images_per_second"]
        rows.append([str(workers), f"{cold:.0f}", f"{warm:.0f}", f"{cold / base[0]['images_per_second']:.2f}x",
                     f"{warm / base[-1]['images_per_second']:.2f}x", f"{result['peak_memory_mb']:.0f}"])
    return (f"scaling with --workers ({cpu_count} CPU cores; speed-up over {fewest} worker"
            f"{'s' if fewest > 1 else ''}):\n\n") + markdown_table(
        ["workers", "epoch 1 (cold) img/s", "epoch 2 (warm) img/s", "cold speed-up", "warm speed-up",
         "peak memory MiB"], rows)
