"""Grad-CAM (Selvaraju et al., 2017) on the model's last convolutional stage.

The model is split at that stage into a feature model and a head; the head's gradient
with respect to the feature maps comes from `backend.gradients.outputs_and_input_gradients`,
i.e. from each backend's own autodiff, so the same code runs on torch, tensorflow and jax.
"""

from __future__ import annotations

import csv
from pathlib import Path

import keras
import numpy as np
from PIL import Image

from backend.gradients import outputs_and_input_gradients
from data.augment import normalize
from inference.run import TrainedRun, read_images
from model.structure import activation_points
from training.metrics import softmax
from training.rundir import spreadsheet_safe

DISPLAY_SIZE = 224  # overlays are drawn at least this large, whatever the model's input size


def cam_layer(model: keras.Model) -> tuple[str, keras.KerasTensor]:
    """The last convolutional stage: the backbone's output, or the hybrid's last head block."""
    name, tensor = list(activation_points(model).items())[-1]
    return name, tensor


def split_at_cam_layer(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    """`(features, head)` with `head(features(x)) == model(x)`."""
    _, tensor = cam_layer(model)
    return keras.Model(model.input, tensor), keras.Model(tensor, model.output)


def grad_cam(model: keras.Model, images: np.ndarray, class_indices: np.ndarray | None = None,
             parts: tuple[keras.Model, keras.Model] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps of normalized NHWC `images` for `class_indices` (default: the predicted
    classes). Returns `(maps, probabilities)`: maps at the feature resolution, >= 0, not
    rescaled (an all-zero map means no region raised the class score)."""
    features_model, head = parts or split_at_cam_layer(model)
    features = np.asarray(keras.ops.convert_to_numpy(features_model(images, training=False)), np.float32)
    logits = np.asarray(keras.ops.convert_to_numpy(head(features, training=False)), np.float32)
    if class_indices is None:
        class_indices = logits.argmax(axis=1)
    selected = np.eye(logits.shape[1], dtype=np.float32)[class_indices]
    _, gradients = outputs_and_input_gradients(head, features, selected)
    channel_weights = gradients.mean(axis=(1, 2))  # global-average-pooled gradients, (N, K)
    maps = np.maximum(np.einsum("nhwk,nk->nhw", features, channel_weights), 0.0)
    return maps.astype(np.float32), softmax(logits)


def upsample(cam: np.ndarray, size: int) -> np.ndarray:
    """A map resized bilinearly to `size` x `size` and scaled to [0, 1]."""
    resized = np.asarray(Image.fromarray(cam.astype(np.float32), "F").resize((size, size), Image.BILINEAR))
    peak = resized.max()
    return resized / peak if peak > 0 else np.zeros_like(resized)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """`image` (uint8 RGB) with `heatmap` (in [0, 1], same size) blended over it in jet colours."""
    import matplotlib

    colours = matplotlib.colormaps["jet"](heatmap)[..., :3] * 255.0
    return np.clip((1 - alpha) * image + alpha * colours, 0, 255).astype(np.uint8)


def side_by_side(run: TrainedRun, path: str, cam: np.ndarray, size: int) -> np.ndarray:
    """The image as the model saw it and its Grad-CAM overlay next to each other, `size` px high."""
    image = run.read(path, size=size)
    return np.concatenate([image, overlay(image, upsample(cam, size))], axis=1)


def explain_files(run: TrainedRun, paths: list[str], out_dir: Path, class_name: str | None = None,
                  batch_size: int = 8) -> list[dict]:
    """Writes `<name>__<class>_<probability>.png` overlays, `gradcam.csv` and `heatmaps.npz`
    (the raw maps) to `out_dir`; returns a row per file (unreadable files get an error)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = split_at_cam_layer(run.model)
    target = None if class_name is None else run.classes.index(class_name)
    display = max(run.image_size, DISPLAY_SIZE)
    rows, failed, maps, probabilities = [], [], [], []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images, errors = read_images(run, chunk)
        failed += [(p, e) for p, e in zip(chunk, errors, strict=True) if e is not None]
        if not len(images):
            continue
        classes = None if target is None else np.full(len(images), target)
        chunk_maps, chunk_probs = grad_cam(run.model, normalize(images, run.preprocess), classes, parts)
        readable = [p for p, e in zip(chunk, errors, strict=True) if e is None]
        for path, cam, p in zip(readable, chunk_maps, chunk_probs, strict=True):
            explained = int(p.argmax()) if target is None else target
            name = f"{len(rows):03d}-{Path(path).stem}__{run.classes[explained]}_{p[explained]:.2f}.png"
            Image.fromarray(side_by_side(run, path, cam, display)).save(out_dir / name)
            rows.append({"path": path, "overlay": name, "explained_class": run.classes[explained],
                         "probability": float(p[explained]), "predicted": run.classes[int(p.argmax())], "error": ""})
        maps.append(chunk_maps)
        probabilities.append(chunk_probs)
    readable = [r["path"] for r in rows]
    maps_all = np.concatenate(maps) if maps else np.zeros((0, 0, 0), np.float32)
    probs_all = np.concatenate(probabilities) if probabilities else np.zeros((0, len(run.classes)))
    rows += [{"path": p, "overlay": "", "explained_class": "", "probability": "", "predicted": "", "error": e}
             for p, e in failed]
    np.savez(out_dir / "heatmaps.npz", paths=np.array(readable, dtype=str), maps=maps_all, probabilities=probs_all)
    with open(out_dir / "gradcam.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["path"])
        writer.writeheader()
        writer.writerows({k: spreadsheet_safe(v) for k, v in row.items()} for row in rows)  # file names are text
    return rows
