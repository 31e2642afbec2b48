"""Training speed, three ways, in one run (`python cli.py bench-train`):

- `keras-fit`: `fit` through the project's input pipeline (decode cache warm, augmentation on),
  compiled as a training run compiles it: what a run's epochs after the first cost.
- `keras-step`: the same model and compile, fed one batch already in memory: the train step
  alone. keras-fit / keras-step close to 1 means the pipeline is never the bottleneck.
- `torchvision`: torchvision's own ResNet50 in a plain PyTorch loop (channels_last, autocast to
  match --precision, optionally torch.compile) at the same batch size, image size and optimizer:
  how far the Keras backend is from native PyTorch.

Each side runs in its own process, so its peak memory is its own and no framework shares the
device with another (torchvision also must not be imported after tensorflow: it segfaults).
Speed is steady state: the first `warmup_steps` (compilation, allocator growth, cache fill) are
left out, then `windows` windows of `window_steps` steps are timed, each closed by reading the
loss back (so queued device work is finished), and the median window is reported.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from markdown_tables import markdown_table
from training.config import TrainConfig

KERAS_FIT, KERAS_STEP, TORCHVISION = "keras-fit", "keras-step", "torchvision"
MODES = (KERAS_FIT, KERAS_STEP, TORCHVISION)
NUM_CLASSES = 4
_RESULT_MARK = "BENCH-TRAIN-RESULT "  # the line of a mode's output that carries its JSON


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """What is measured and how long; the options a training run also has take its defaults
    (TrainConfig's), the rest are the benchmark's own."""

    image_size: int = TrainConfig.image_size
    batch_size: int = TrainConfig.batch_size
    precision: str = TrainConfig.precision
    jit_compile: str = TrainConfig.jit_compile
    steps_per_execution: int = TrainConfig.steps_per_execution
    workers: int = TrainConfig.workers
    data_dir: str | None = None  # None: phantom demo images, made for the run
    warmup_steps: int = 3
    window_steps: int = 5
    windows: int = 3
    learning_rate: float = TrainConfig.learning_rate
    torch_compile: bool = False

    @property
    def steps(self) -> int:
        return self.warmup_steps + self.window_steps * self.windows

    def closes_window(self, steps_done: int) -> bool:
        """Whether a timing window starts or ends after `steps_done` steps: there the loop waits
        for the device, so the clock reads finished work, not queued work."""
        return steps_done % self.window_steps == self.warmup_steps % self.window_steps


def window_rates(step_ends: list[float], settings: BenchSettings) -> list[float]:
    """Images per second in each timed window, from the time each step ended (`step_ends[i]`:
    the end of step i + 1, so `step_ends[warmup - 1]` starts the first window)."""
    rates = []
    for w in range(settings.windows):
        start = settings.warmup_steps - 1 + w * settings.window_steps
        seconds = step_ends[start + settings.window_steps] - step_ends[start]
        rates.append(settings.window_steps * settings.batch_size / seconds)
    return rates


def summarize(step_ends: list[float], settings: BenchSettings, peak_memory_mb: float, **extra) -> dict:
    rates = window_rates(step_ends, settings)
    median = statistics.median(rates)
    return {"images_per_second": median, "ms_per_step": 1000 * settings.batch_size / median,
            "window_images_per_second": rates, "peak_memory_mb": round(peak_memory_mb, 1), **extra}


# -- keras-fit and keras-step: run in a child process under the active backend ----------------

def _train_config(settings: BenchSettings, data_dir: str) -> TrainConfig:
    # A from-scratch training run's options (the backbone's start does not change the speed).
    return TrainConfig(data_dir=data_dir, image_size=settings.image_size, batch_size=settings.batch_size,
                       precision=settings.precision, jit_compile=settings.jit_compile,
                       steps_per_execution=settings.steps_per_execution, workers=settings.workers,
                       learning_rate=settings.learning_rate, weights="none", epochs=1, verbose=0)


def _keras_batches(mode: str, settings: BenchSettings, data_dir: str):
    """keras-fit: the run's training batches over a warm decode cache; keras-step: its first
    batch, served again and again from memory."""
    import keras

    from data.discovery import discover
    from training.train import scanned_training_batches

    cfg = _train_config(settings, data_dir)
    _, examples, _, _ = discover(data_dir)
    batches = scanned_training_batches(cfg, examples)  # decoded into the cache, as a run's epoch 2 has it
    if len(batches) < settings.steps:
        raise ValueError(f"{len(batches.examples)} images give {len(batches)} batches; the benchmark needs "
                         f"{settings.steps}")
    if mode == KERAS_FIT:
        return cfg, batches
    images, labels = batches.batch(0, 0)

    class SameBatch(keras.utils.PyDataset):
        def __len__(self) -> int:
            return settings.steps

        def __getitem__(self, index: int):
            return images, labels

    return cfg, SameBatch()


def run_keras(mode: str, settings: BenchSettings, data_dir: str) -> dict:
    """Times `fit` (keras-fit or keras-step) under the active backend, compiled as `train` does."""
    import keras

    from backend.determinism import set_random_seed
    from backend.devices import device_peak_memory_mb, devices, peak_memory_mb
    from model import build_model
    from training.schedule import plan_phases
    from training.train import compile_phase

    cfg, batches = _keras_batches(mode, settings, data_dir)
    set_random_seed(0)
    model = build_model(cfg.model_spec(), NUM_CLASSES, cfg.image_size, "none")
    compile_phase(model, plan_phases(cfg)[0], None, settings.steps, 0)
    step_ends: list[float] = []

    class StepClock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if settings.closes_window(batch + 1):
                keras.ops.convert_to_numpy(logs["loss"])  # wait for the device
            step_ends.extend([time.perf_counter()] * (batch + 1 - len(step_ends)))  # steps_per_execution > 1

    model.fit(batches, epochs=1, steps_per_epoch=settings.steps, callbacks=[StepClock()], verbose=0)
    return summarize(step_ends, settings, device_peak_memory_mb() or peak_memory_mb(),
                     jit_compile=bool(model.jit_compile), devices=devices())


# -- torchvision: native PyTorch, in a child process that imports no Keras -------------------

def run_torchvision(settings: BenchSettings) -> dict:
    """torchvision's resnet50 trained on one batch in memory, the way NVIDIA's and torchvision's
    reference scripts run it fast: channels_last, autocast (bfloat16, or float16 with a
    GradScaler), Adam at the same learning rate, optionally torch.compile."""
    import torch
    import torchvision

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=NUM_CLASSES).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    amp_dtype = {"mixed_bfloat16": torch.bfloat16, "mixed_float16": torch.float16}.get(settings.precision)
    scaler = torch.amp.GradScaler(device, enabled=amp_dtype is torch.float16)
    step = torch.compile(model) if settings.torch_compile else model
    images = torch.randn(settings.batch_size, 3, settings.image_size, settings.image_size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, NUM_CLASSES, (settings.batch_size,), device=device)
    step_ends = []
    for i in range(settings.steps):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = torch.nn.functional.cross_entropy(step(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if settings.closes_window(i + 1):
            loss.item()  # wait for the device
        step_ends.append(time.perf_counter())
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        devices = [torch.cuda.get_device_name(0)]
    else:
        from backend.devices import peak_memory_mb  # imports no framework

        peak, devices = peak_memory_mb(), ["cpu"]
    return summarize(step_ends, settings, peak, torch_compile=settings.torch_compile, devices=devices,
                     versions={"torch": torch.__version__, "torchvision": torchvision.__version__})


# -- the parent: one child per mode, the table ----------------------------------------------

def torchvision_importable() -> bool:
    """Whether torchvision imports here (in a child: a broken pair can abort the process)."""
    code = "import torchvision"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def measure(mode: str, settings: BenchSettings, data_dir: str, env: dict[str, str]) -> dict:
    """Runs one mode in a child process; returns its result (or `{"error": ...}`)."""
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "bench.train", mode, json.dumps(dataclasses.asdict(settings)), data_dir]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith(_RESULT_MARK):
            return json.loads(line[len(_RESULT_MARK):])
    last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
    return {"error": last}


def demo_images_for(settings: BenchSettings, folder: Path) -> str:
    """Phantom demo images, enough for every timed step of keras-fit (one epoch, no repeats)."""
    from data.demo import make_demo_data

    make_demo_data(folder, train_per_class=math.ceil(settings.steps * settings.batch_size / NUM_CLASSES),
                   test_per_class=1)
    return str(folder)


def run_bench(settings: BenchSettings, backend: str, env: dict[str, str], native: bool = True,
              log=print) -> dict:
    """Every mode, one after another; returns the settings and each mode's result. Options a
    training run would refuse (e.g. --steps-per-execution on torch) are refused here first."""
    _train_config(settings, settings.data_dir or ".").check_schedule()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        data_dir = settings.data_dir or demo_images_for(settings, Path(tmp) / "demo")
        results = {}
        for mode in MODES:
            if mode == TORCHVISION and not native:
                continue
            if mode == TORCHVISION and not torchvision_importable():
                results[mode] = {"error": "torchvision is not installed (or does not import beside this torch)"}
                continue
            log(f"measuring {mode} ({settings.steps} steps) ...")
            results[mode] = measure(mode, settings, data_dir, env)
    return {"backend": backend, "settings": dataclasses.asdict(settings), "results": results}


def format_report(report: dict) -> str:
    """The results as a markdown table, with what was measured above it."""
    s, results = report["settings"], report["results"]
    step = results.get(KERAS_STEP, {}).get("images_per_second")
    native = results.get(TORCHVISION, {}).get("images_per_second")
    labels = {KERAS_FIT: f"keras {report['backend']}: fit through the pipeline",
              KERAS_STEP: f"keras {report['backend']}: train step, batch in memory",
              TORCHVISION: "native torchvision resnet50" + (" + torch.compile" if s["torch_compile"] else "")}
    rows = []
    for mode, result in results.items():
        if "error" in result:
            rows.append([labels[mode], "-", "-", "-", "-", "-", result["error"]])
            continue
        rate = result["images_per_second"]
        rows.append([labels[mode], f"{rate:.1f}", f"{result['ms_per_step']:.0f}", f"{result['peak_memory_mb']:.0f}",
                     f"{rate / step:.2f}" if step else "-", f"{rate / native:.2f}" if native else "-",
                     ", ".join(result["devices"])])
    compiled = results.get(KERAS_STEP, {}).get("jit_compile")
    head = (f"{s['image_size']} px, batch {s['batch_size']}, {s['precision']}, jit_compile {s['jit_compile']}"
            + (f" (resolved: {compiled})" if compiled is not None else "")
            + f", steps_per_execution {s['steps_per_execution']}; median of {s['windows']} windows of "
            f"{s['window_steps']} steps after {s['warmup_steps']} warm-up steps")
    return head + "\n\n" + markdown_table(
        ["", "images/s", "ms/step", "peak memory (MiB)", "x keras step", "x torchvision", "device"], rows)


def main(argv: list[str]) -> None:
    mode, settings = argv[0], BenchSettings(**json.loads(argv[1]))
    result = run_torchvision(settings) if mode == TORCHVISION else run_keras(mode, settings, argv[2])
    print(_RESULT_MARK + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
