"""`parity`: do the backends compute the same thing from the same weights and batch?

The parent process imports no backend. It runs one worker subprocess per backend
(`python -m studies.worker parity`, see `studies.worker`); each builds the same batch with the shared pipeline,
loads one weights file, and saves what it computed to an `.npz`. The parent checks
the batch hashes, compares every pair of backends and tolerances, and reports.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import tempfile
from pathlib import Path

import click
import numpy as np

from data.augment import PREPROCESS_MODES
from errors import UserInputError
from markdown_tables import markdown_table
from model.spec import MODELS
from training.config import TrainConfig
from training.options import PositiveFloat, option
from training.rundir import write_json

CHECK = "What is checked"

PRECISIONS = ("float32", "mixed_bfloat16")  # those of model.spec.PRECISIONS whose tolerances are measured
PLANTS = ("weight", "preprocess")
PLANTED_WEIGHT_DELTA = 1e-3

# A pair of backends passes a quantity when its relative difference is within
# max(floor, NOISE_FACTOR x noise floor). The noise floor is measured in the run: how
# far one backend's own result moves when the batch moves by one float32 ulp. Through
# ReLU masks and BatchNormalization on few samples, rounding noise grows to about 1e-2
# in some gradients of ResNet50 (backends.md), so a fixed float32 tolerance would be
# either loose for logits or wrong for gradients. The floors are the float32 (or
# bfloat16) rounding level of each quantity; a planted 1e-3 change in one weight is
# 4-140x above the tolerance (backends.md, tests/test_parity.py).
NOISE_FACTOR = 4.0
# Above this the noise floor says the quantity is not determined at this precision
# (bfloat16 training from random weights): reported as NOISY, neither PASS nor FAIL.
MAX_TOLERANCE = 0.5
TOLERANCES = {
    "float32": {
        "inference logits": 1e-5,
        "training logits": 1e-5,
        "loss": 1e-5,
        "gradients": 1e-4,
        "weights after SGD step": 1e-4,
    },
    "mixed_bfloat16": {
        "inference logits": 2e-2,
        "training logits": 2e-2,
        "loss": 2e-2,
        "gradients": 5e-2,
        "weights after SGD step": 5e-2,
    },
}
QUANTITIES = tuple(TOLERANCES["float32"])
# Quantities computed from others inherit their noise: the loss from the training
# logits (one ulp-nudge is a single sample, and a scalar's can come out small by
# chance), the SGD step (lr x gradient) from the gradients.
NOISE_SOURCES = {
    "loss": ("loss", "training logits"),
    "weights after SGD step": ("gradients",),
}


class ParityError(RuntimeError):
    """A backend's worker could not compute its results."""


class ModelFileError(UserInputError):
    """A `--model-file` that a backend cannot load or that parity cannot feed: one line per backend."""


@dataclasses.dataclass(frozen=True)
class ModelInput:
    """What a model file declares: its square input side, channels, classes, and whether its
    outputs are probabilities (a final softmax) rather than logits."""

    size: int
    channels: int
    classes: int
    from_logits: bool


@dataclasses.dataclass
class ParityConfig:
    """What one parity check computes: which model, input and precision (the `parity`
    command's options are made from these fields)."""

    backends: tuple[str, ...] = ("torch", "tensorflow", "jax")
    data_dir: str | None = option(None, "Where the batch comes from (default: generated phantoms).",
                                  type=click.Path(exists=True, file_okay=False), group=CHECK)
    image_size: int = option(64, type=click.IntRange(32), group=CHECK)
    batch_size: int = option(4, type=click.IntRange(2), group=CHECK)
    model: str = option(TrainConfig.model, "hybrid: with the default --cut, --head-blocks, --head-filters and --se "
                        "of `hybrid`.", type=click.Choice(MODELS), group=CHECK)
    precision: str = option("float32", "Keras dtype policy; each has its own tolerances.",
                            type=click.Choice(PRECISIONS), group=CHECK)
    preprocess: str = option(TrainConfig.preprocess, type=click.Choice(PREPROCESS_MODES), group=CHECK)
    learning_rate: float = option(0.01, "Learning rate of the one SGD step.", type=PositiveFloat(), flag="--lr", group=CHECK)
    seed: int = option(TrainConfig.seed, type=int, group=CHECK)
    model_file: str | None = option(None, "Check your own Keras 3 image classifier (.keras) instead of --model: "
                                    "its weights, its declared input size (square; 1 or 3 channels) and classes; "
                                    "its predictions on every image of --data-dir are compared too.",
                                    type=click.Path(exists=True, dir_okay=False), group=CHECK)
    plant: dict[str, str] = dataclasses.field(default_factory=dict)


# --- the worker: runs under one backend ---------------------------------------------


def parity_batch(cfg: ParityConfig, preprocess: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Batch 0 of epoch 0 of the training pipeline (augmented), and its SHA-256."""
    from data.loader import pipeline_hash
    from training.config import TrainConfig
    from training.train import scanned_training_batches

    batches = scanned_training_batches(TrainConfig(
        data_dir=cfg.data_dir, image_size=cfg.image_size, batch_size=cfg.batch_size,
        preprocess=preprocess, seed=cfg.seed, workers=1,
    ))
    images, labels = batches.batch(0, 0)
    return images, labels, pipeline_hash(batches, 0, 1)


def load_model_file(path: str):
    """A user's `.keras` classifier, loaded with safe_mode, and what it declares; its dropout off
    (its masks would come from each backend's own RNG). Raises `ModelFileError` in one line."""
    import keras

    backend = keras.backend.backend()
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as e:  # unknown custom layers, Lambda under safe_mode, a damaged file: many types
        # Keras wraps the cause in a page about deserialization: the cause is what a reader needs.
        reason = " ".join(str(e).split()).rsplit("Exception encountered: ", 1)[-1][:300] or type(e).__name__
        raise ModelFileError(f"the {backend} backend cannot load {path}: {reason}") from None
    shape, out = tuple(model.input_shape), tuple(model.output_shape)
    if len(shape) != 4 or shape[1] is None or shape[1] != shape[2] or shape[3] not in (1, 3) or len(out) != 2:
        raise ModelFileError(f"{path}: parity checks image classifiers with a square input of 1 or 3 channels "
                             f"and one output of class scores; this model declares input {shape}, output {out}")
    for layer in model._flatten_layers(include_self=False):
        if "Dropout" in type(layer).__name__ and hasattr(layer, "rate"):
            layer.rate = 0.0
    last = getattr(model.layers[-1], "activation", None)
    softmax = last is keras.activations.softmax or getattr(last, "__name__", "") == "softmax"
    return model, ModelInput(int(shape[1]), int(shape[3]), int(out[1]), from_logits=not softmax)


def build_parity_model(cfg: ParityConfig, num_classes: int):
    """The model under test, without dropout: its masks come from each backend's own RNG."""
    from model import ModelSpec, build_model

    return build_model(ModelSpec(cfg.model, dropout=0.0, precision=cfg.precision), num_classes, cfg.image_size)


def _numpy(x) -> np.ndarray:
    import keras

    return np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(x, "float32")))


def _load(model, weights_path: Path, plant: str | None) -> None:
    import keras

    model.load_weights(weights_path)
    if plant == "weight":
        first = model.trainable_variables[0]
        value = keras.ops.convert_to_numpy(first.value).copy()
        value.flat[0] += PLANTED_WEIGHT_DELTA
        first.assign(value)


def _forward_backward(model, images, labels, from_logits: bool = True) -> dict[str, np.ndarray]:
    import keras

    from backend.gradients import loss_and_gradients

    results = {"inference logits": _numpy(model(images, training=False))}
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
    logits, loss, grads = loss_and_gradients(model, images, labels, loss_fn)
    results["training logits"] = _numpy(logits)
    results["loss"] = _numpy(loss)
    for variable, grad in zip(model.trainable_variables, grads, strict=True):
        results[f"gradients/{variable.path}"] = _numpy(grad)
    results["_grads"] = grads
    return results


def run_worker(cfg: ParityConfig, weights_path: Path, out_path: Path) -> None:
    """Computes every compared quantity under the active backend and saves it to `out_path`.

    It also computes them for the batch moved by one float32 ulp, saved under
    `noise/`: how much this backend's own result moves under rounding-level noise.
    """
    import keras

    from backend.determinism import set_random_seed

    backend = keras.backend.backend()
    plant = cfg.plant.get(backend)
    declared = None
    if cfg.model_file:
        model, declared = load_model_file(cfg.model_file)
        cfg = dataclasses.replace(cfg, image_size=declared.size)
    images, labels, digest = parity_batch(cfg, _other(cfg.preprocess) if plant == "preprocess" else cfg.preprocess)
    if declared is None:
        set_random_seed(cfg.seed)
        model = build_parity_model(cfg, num_classes=4)  # in cfg.precision (build_model sets the policy)
    else:
        images, labels = _fit_channels(images, declared.channels), labels % declared.classes
    if not weights_path.exists():  # The first backend writes the one weights file.
        model.save_weights(weights_path)
    from_logits = declared is None or declared.from_logits

    _load(model, weights_path, plant)
    nudged = _nudge(images, cfg.precision)
    noise = _forward_backward(model, nudged, labels, from_logits)
    noise.pop("_grads")

    _load(model, weights_path, plant)  # Undo the BatchNormalization updates of that pass.
    if declared is not None:  # the file's model on every image of the folder, before the SGD step
        results_on_folder = _folder_outputs(model, cfg, declared)
    results = _forward_backward(model, images, labels, from_logits)
    grads = results.pop("_grads")
    keras.optimizers.SGD(cfg.learning_rate).apply(grads, model.trainable_variables)
    for variable in model.weights:
        results[f"weights after SGD step/{variable.path}"] = _numpy(variable.value)
    results.update({f"noise/{k}": v for k, v in noise.items()})
    if declared is not None:
        results.update(results_on_folder)
    from backend.selection import environment

    env = environment()
    about = {"versions": env["versions"], "devices": env["devices"], "processor": env["processor"]}
    np.savez(out_path, batch_sha256=np.array(digest), environment=np.array(json.dumps(about)), **results)


def _fit_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """The RGB batch for a model of `channels`: a one-channel model gets the channels' mean
    (the grayscale image itself when R = G = B)."""
    return images if channels == 3 else images.mean(axis=-1, keepdims=True, dtype=np.float32)


def _folder_outputs(model, cfg: ParityConfig, declared: ModelInput) -> dict[str, np.ndarray]:
    """The model's outputs (inference mode) on every image of `cfg.data_dir`, unaugmented."""
    from data.augment import normalize
    from data.decode import DecodeError, decode_and_resize
    from data.fingerprint import dataset_files, relative
    from training.metrics import softmax

    paths, outputs = [], []
    for path in dataset_files(cfg.data_dir):
        try:
            image = decode_and_resize(path, declared.size)
        except DecodeError:
            continue  # unreadable for every backend alike
        paths.append(relative(path, cfg.data_dir))
        outputs.append(image)
    chunks = [_numpy(model(_fit_channels(normalize(np.stack(outputs[i:i + 32]), cfg.preprocess), declared.channels),
                           training=False)) for i in range(0, len(outputs), 32)]
    scores = np.concatenate(chunks)
    return {"folder/paths": np.array(paths, dtype=str),
            "folder/probabilities": scores if not declared.from_logits else softmax(scores)}


def folder_agreement(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict:
    """How two backends' predictions on the folder agree: same top class, largest probability gap."""
    if list(a["folder/paths"]) != list(b["folder/paths"]):
        raise ParityError("the backends read different images of the folder")
    pa, pb = a["folder/probabilities"], b["folder/probabilities"]
    return {"images": len(pa), "same_prediction": int((pa.argmax(1) == pb.argmax(1)).sum()),
            "max_probability_difference": float(np.abs(pa - pb).max()) if len(pa) else 0.0}


def _nudge(images: np.ndarray, precision: str) -> np.ndarray:
    """The batch moved by one unit in the last place of the precision the model computes in."""
    if precision == "float32":
        return np.nextafter(images, np.float32(np.inf))
    # bfloat16 keeps 8 significant bits; a float32 ulp would vanish in the cast.
    return images * np.float32(1 + 2**-7)


def _other(preprocess: str) -> str:
    return "imagenet" if preprocess == "caffe" else "caffe"


# --- the parent: compares ------------------------------------------------------------


def _relative_l2(a: np.ndarray, b: np.ndarray, floor: float) -> float:
    scale = max(float(np.linalg.norm(a)), float(np.linalg.norm(b)), floor)
    return float(np.linalg.norm(a - b)) / scale if scale > 0 else 0.0


def _tensors(result: dict[str, np.ndarray], quantity: str) -> dict[str, np.ndarray]:
    return {k[len(quantity) + 1:]: v for k, v in result.items()
            if k == quantity or k.startswith(quantity + "/")}


def worst_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float, float, str]:
    """(max abs diff, worst relative L2 diff, name of the worst tensor) over same-named tensors."""
    if set(a) != set(b):
        raise ValueError(f"different tensors: {sorted(set(a) ^ set(b))[:5]}")
    # Tensors that are zero in exact arithmetic (the gradient of a conv bias that a
    # BatchNormalization cancels) are measured against the largest tensor's scale,
    # not against their own rounding noise.
    floor = 1e-3 * max(float(np.linalg.norm(v)) for v in b.values())
    max_abs, max_rel, worst = 0.0, -1.0, ""
    for name in a:
        rel = _relative_l2(a[name], b[name], floor)
        if a[name].size:
            max_abs = max(max_abs, float(np.max(np.abs(a[name] - b[name]))))
        if rel > max_rel:
            max_rel, worst = rel, name
    return max_abs, max_rel, worst


def compare_pair(a: dict[str, np.ndarray], b: dict[str, np.ndarray], precision: str,
                 pool: list[dict[str, np.ndarray]] | None = None) -> list[dict]:
    """One row per quantity: max abs and relative diff, worst tensor, noise floor, PASS/FAIL.

    The noise floor is the largest change of any backend's own result in `pool` (default: the
    two compared) when the batch moves by one ulp: differences near it are rounding, amplified by
    the network. That amplification belongs to the model and the batch, not to a framework, and
    each backend's nudge is one sample of it, which can come out small by chance: so the run
    pools the samples of every backend it computed.
    """
    rows = [{
        "quantity": "batch bytes (sha256)", "max_abs": None, "max_rel": None, "noise_floor": None,
        "tolerance": None, "worst": None, "passed": str(a["batch_sha256"]) == str(b["batch_sha256"]),
    }]
    for quantity in QUANTITIES:
        max_abs, max_rel, worst = worst_difference(_tensors(a, quantity), _tensors(b, quantity))
        noise = max(
            worst_difference(_tensors(r, f"noise/{measured}"), _tensors(r, measured))[1]
            for r in (pool or (a, b)) for measured in NOISE_SOURCES.get(quantity, (quantity,))
        )
        tolerance = max(TOLERANCES[precision][quantity], NOISE_FACTOR * noise)
        rows.append({
            "quantity": quantity, "max_abs": max_abs, "max_rel": max_rel,
            "noise_floor": noise, "tolerance": tolerance,
            "worst": worst or None, "passed": None if tolerance > MAX_TOLERANCE else max_rel <= tolerance,
        })
    return rows


def _verdict(passed: bool | None) -> str:
    return "NOISY" if passed is None else "PASS" if passed else "FAIL"


def format_parity_table(report: dict) -> str:
    """The parity report as a Markdown table (quantity x backend pair)."""
    def fmt(v: float | None) -> str:
        return "" if v is None else f"{v:.2e}"

    header = ["quantity", "backends", "max abs diff", "max rel diff", "1-ulp noise floor", "tolerance",
              "worst tensor", "result"]
    rows = [[row["quantity"], pair, *(fmt(row[k]) for k in ("max_abs", "max_rel", "noise_floor", "tolerance")),
             row["worst"] or "", _verdict(row["passed"])]
            for pair, pair_rows in report["pairs"].items() for row in pair_rows]
    return markdown_table(header, rows, "llrrrrll")


def run_parity(cfg: ParityConfig, out_dir: Path, log=print) -> dict:
    """Runs a worker per backend, compares every pair, writes parity.json and parity.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data_source = cfg.data_dir or "generated phantoms (data/demo.py)"
    with tempfile.TemporaryDirectory(prefix="parity-") as tmp:
        tmp = Path(tmp)
        if cfg.data_dir is None:
            from data.demo import make_demo_data

            make_demo_data(tmp / "data", train_per_class=max(2, cfg.batch_size), test_per_class=1)
            cfg = dataclasses.replace(cfg, data_dir=str(tmp / "data"))
        spec = tmp / "spec.json"
        spec.write_text(json.dumps(dataclasses.asdict(cfg)))
        weights = out_dir / "parity.weights.h5"
        weights.unlink(missing_ok=True)
        outputs = {}
        for backend in cfg.backends:
            log(f"computing on {backend} ...")
            outputs[backend] = tmp / f"{backend}.npz"
            _run_worker_process(backend, spec, weights, outputs[backend])
        results = {b: dict(np.load(p)) for b, p in outputs.items()}
    pairs = {
        f"{a} vs {b}": compare_pair(results[a], results[b], cfg.precision, list(results.values()))
        for a, b in itertools.combinations(cfg.backends, 2)
    }
    agreement = {f"{a} vs {b}": folder_agreement(results[a], results[b])
                 for a, b in itertools.combinations(cfg.backends, 2)} if cfg.model_file else None
    for r in results.values():
        for key in ("folder/paths", "folder/probabilities"):
            r.pop(key, None)
    report = {
        "config": dataclasses.asdict(cfg) | {"data_dir": data_source},
        "folder_agreement": agreement,
        "weights_file": str(weights),
        "environments": {b: json.loads(str(r.pop("environment"))) for b, r in results.items()},
        "losses": {b: float(r["loss"]) for b, r in results.items()},
        "pairs": pairs,
        "passed": all(row["passed"] is not False for rows in pairs.values() for row in rows),
    }
    write_json(out_dir / "parity.json", report)
    (out_dir / "parity.md").write_text(format_parity_table(report) + "\n")
    return report


def _run_worker_process(backend: str, spec: Path, weights: Path, out: Path) -> None:
    from studies.processes import in_process

    result = in_process(backend, "parity", str(spec), str(weights), str(out), capture=True)
    lines = result.stderr.strip().splitlines()
    if result.returncode == 2 and lines and lines[-1].startswith("error: "):  # the model file, refused
        raise ModelFileError(lines[-1].removeprefix("error: "))
    if result.returncode != 0:
        raise ParityError(f"the {backend} parity worker failed (exit {result.returncode}):\n"
                           f"{result.stderr[-3000:]}")
