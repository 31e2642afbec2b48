"""Converts a torchvision ResNet50 state dict into the Keras layout of `model.resnet` (v1.5).

`python -m model.torchvision_convert SPEC` (SPEC: `torchvision`, `torchvision-v2` or a
.pth path) is what `model.weights.resolve_torchvision_weights` runs in a subprocess, so that
only this process loads torch. It downloads torchvision's file into torch.hub's cache if it
is absent, checks that the state dict is a ResNet50's (every key and shape), and writes one
HDF5 group per Keras layer (`conv2_block1_1_conv`: datasets `0`, `1` ... in the order of the
layer's `get_weights`) into `model.weights.converted_torchvision_file`. A `WeightsError` is
printed as one line on stderr (`WeightsError: ...`), exit code 2.

The layout changes: convolution kernels OIHW -> HWIO, the fully connected layer (kept, as
`predictions`, to check the conversion against torchvision's logits) (out, in) -> (in, out);
BatchNorm's weight, bias, running mean and running variance are Keras' gamma, beta, moving
mean and moving variance.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from model.spec import STAGE_BLOCKS, STAGE_FILTERS, TORCHVISION_V15
from model.weights import (
    CONVERTED_FORMAT,
    TORCH_INSTALL,
    TORCHVISION_URL,
    TORCHVISION_WEIGHTS,
    WeightsError,
    cached_sha256,
    check_torchvision_file,
    converted_torchvision_file,
    first_line,
    torchvision_checkpoint,
)

FEATURES = 2048  # channels of the last stage, the fully connected layer's input
BN_PARAMS = ("weight", "bias", "running_mean", "running_var")  # Keras' gamma, beta, moving mean, moving var
BN_COUNTER = "num_batches_tracked"  # training-only; older files lack it
EXAMPLES = 3  # keys named in an error, per kind of mismatch


def modules() -> list[tuple[str, str, str, tuple[int, ...]]]:
    """`(torchvision module, Keras layer, kind, weight shape)` of every layer with weights,
    the fully connected layer last (its output size is whatever the file has)."""
    table = [("conv1", "conv1_conv", "conv", (64, 3, 7, 7)), ("bn1", "conv1_bn", "bn", (64,))]
    channels = 64
    for index, (stage, blocks) in enumerate(STAGE_BLOCKS.items(), start=1):
        width = STAGE_FILTERS[stage]
        for block in range(blocks):
            torch_name, keras_name = f"layer{index}.{block}", f"{stage}_block{block + 1}"
            if block == 0:
                table += [(f"{torch_name}.downsample.0", f"{keras_name}_0_conv", "conv", (4 * width, channels, 1, 1)),
                          (f"{torch_name}.downsample.1", f"{keras_name}_0_bn", "bn", (4 * width,))]
            convs = ((width, channels, 1, 1), (width, width, 3, 3), (4 * width, width, 1, 1))
            for k, shape in enumerate(convs, start=1):
                table += [(f"{torch_name}.conv{k}", f"{keras_name}_{k}_conv", "conv", shape),
                          (f"{torch_name}.bn{k}", f"{keras_name}_{k}_bn", "bn", (shape[0],))]
            channels = 4 * width
    return [*table, ("fc", "predictions", "dense", (-1, FEATURES))]


def expected_shapes(classes: int) -> dict[str, tuple[int, ...]]:
    """Every key of torchvision's `resnet50(num_classes=classes).state_dict()` and its shape,
    less the BatchNorm counters."""
    shapes = {}
    for module, _, kind, shape in modules():
        if kind == "conv":
            shapes[f"{module}.weight"] = shape
        elif kind == "bn":
            shapes.update({f"{module}.{p}": shape for p in BN_PARAMS})
        else:
            shapes.update({f"{module}.weight": (classes, FEATURES), f"{module}.bias": (classes,)})
    return shapes


def _examples(keys: list[str]) -> str:
    more = f", ... ({len(keys)} in all)" if len(keys) > EXAMPLES else ""
    return ", ".join(keys[:EXAMPLES]) + more


def check_layout(state: dict[str, np.ndarray], source: str) -> None:
    """Raises `WeightsError` naming the missing and unexpected keys and the wrong shapes,
    unless `state` is a torchvision ResNet50's state dict (any number of classes)."""
    fc = state.get("fc.weight")
    expected = expected_shapes(fc.shape[0] if fc is not None and fc.ndim == 2 else 1000)
    keys = [k for k in state if not k.endswith(f".{BN_COUNTER}")]
    problems = []
    if missing := [k for k in expected if k not in state]:
        problems.append(f"missing {_examples(missing)}")
    if unexpected := [k for k in keys if k not in expected]:
        problems.append(f"unexpected {_examples(unexpected)}")
    if shapes := [f"{k} {tuple(state[k].shape)} (not {expected[k]})" for k in keys
                  if k in expected and tuple(state[k].shape) != expected[k]]:
        problems.append(f"wrong shapes {_examples(shapes)}")
    if problems:
        # A ResNet18 or ResNet34 has two 3x3 convolutions a block and no conv3.
        hint = " (basic blocks without conv3: a ResNet18 or ResNet34?)" if not any(".conv3." in k for k in keys) else ""
        raise WeightsError(f"{source} is not a torchvision ResNet50 state dict{hint}: {'; '.join(problems)}")


def to_keras(state: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """`{Keras layer: its weights in get_weights order}` from a checked state dict."""
    layers = {}
    for module, layer, kind, _ in modules():
        if kind == "conv":
            layers[layer] = [state[f"{module}.weight"].transpose(2, 3, 1, 0)]
        elif kind == "bn":
            layers[layer] = [state[f"{module}.{p}"] for p in BN_PARAMS]
        else:
            layers[layer] = [state[f"{module}.weight"].T, state[f"{module}.bias"]]
    return {name: [np.ascontiguousarray(a, np.float32) for a in arrays] for name, arrays in layers.items()}


def load_state_dict(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a .pth file as float32 arrays, read with `weights_only=True` (no code
    in the file runs)."""
    try:
        import torch
    except ImportError as e:  # installed but broken (find_spec found it)
        raise WeightsError(f"reading {path} needs torch, which cannot be imported ({first_line(e)}): "
                           f"{TORCH_INSTALL}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many kinds on a bad file; each is one line here
        raise WeightsError(f"{path} is not a readable PyTorch state dict (a whole pickled model must be saved as "
                           f"model.state_dict()): {type(e).__name__}: {first_line(e)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict (a dict of tensors, as "
                           f"torch.save(model.state_dict(), path) writes)")
    return {k: v.detach().cpu().float().numpy() for k, v in state.items()}


def download(name: str) -> Path:
    """torchvision's file of `--weights name`, downloaded into torch.hub's cache with its hash
    checked, through torchvision's weights API; without a usable torchvision, through
    torch.hub with the same URL (what that API calls), which lands in the same file."""
    member, file_name = TORCHVISION_WEIGHTS[name]
    try:
        try:
            from torchvision.models import ResNet50_Weights
        except Exception:  # absent, or built for another torch: torch.hub does the same
            import torch.hub

            torch.hub.load_state_dict_from_url(TORCHVISION_URL + file_name, progress=False, check_hash=True)
        else:
            ResNet50_Weights[member].get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad hash is a RuntimeError
        raise WeightsError(f"cannot download {TORCHVISION_URL}{file_name} into {torchvision_checkpoint(name).parent}"
                           f"/: {type(e).__name__}: {first_line(e)}") from None
    return torchvision_checkpoint(name)


def source_file(spec: str) -> Path:
    if spec not in TORCHVISION_WEIGHTS:
        return Path(spec)
    path = torchvision_checkpoint(spec)
    if not path.is_file():
        path = download(spec)
    check_torchvision_file(path)
    return path


def write_converted(layers: dict[str, list[np.ndarray]], source: Path) -> Path:
    """Writes the converted file beside Keras' models, through a temporary file and a rename:
    runs converting at once (a compare's backends) never read half a file."""
    import h5py

    dest = converted_torchvision_file(source)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs.update(format=CONVERTED_FORMAT, source_sha256=cached_sha256(source), source=str(source),
                           arch=TORCHVISION_V15)
            for name, arrays in layers.items():
                group = f.create_group(name)
                for i, array in enumerate(arrays):
                    group.create_dataset(str(i), data=array)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def convert(spec: str) -> Path:
    """Converts `--weights spec` (see the module's docstring); returns the converted file."""
    source = source_file(spec)
    state = load_state_dict(source)
    check_layout(state, str(source))
    return write_converted(to_keras(state), source)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(f"usage: python -m {__spec__.name if __spec__ else 'model.torchvision_convert'} "
              f"torchvision|torchvision-v2|PATH.pth", file=sys.stderr)
        return 2
    try:
        print(convert(argv[0]))
    except WeightsError as e:
        print(f"{WeightsError.__name__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
