"""ResNet50 v1.5 as torchvision builds it, and torchvision's weights in Keras: the converted
model gives torchvision's logits, wrong state dicts and missing files are refused with one
line, and the v1 backbone is still exactly `keras.applications.ResNet50`.

torch and torchvision run in a subprocess (`TORCH_REFERENCE`), never in the test process:
importing torchvision into a process that has loaded tensorflow crashes it (segmentation
fault, tensorflow-cpu 2.21 with torch 2.14 and torchvision 0.29), which is also why the
project converts in a subprocess. The tests that need torchvision skip without it (the
project's lock has torch, not torchvision)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from checksums import file_sha256
from data.augment import normalize
from data.decode import decode_and_resize
from data.demo import make_demo_data
from model import ModelSpec, WeightsError, build_classifier, build_model, resolve_backbone_weights
from model import weights as weights_module
from model.classifier import build_backbone
from model.resnet import load_backbone_weights, load_converted, resnet50
from model.spec import ARCHS, CUT_LAYERS, KERAS_V1, TORCHVISION_V15
from model.structure import residual_blocks, set_backbone_trainable
from model.weights import converted_torchvision_file, resolve_arch
from tests.conftest import ROOT, active_backend, cli_env
from tests.test_cli import error_lines, go_offline, run_cli

# 64: even sides at every stride-2 layer, where Keras' "same" padding would pad only the bottom
# and right (that error gives a relative difference of about 0.9); 97: odd sides, where the
# output sizes' rounding would show.
SIZES = (64, 97)
# float32 through 53 layers, three frameworks' kernels: max |diff| / max |logit| measured 2e-6
# to 6e-6 on every backend; 1e-4 still catches a layout or padding error (those give
# differences of the order of the logits themselves).
RELATIVE_TOLERANCE = 1e-4
# torch.hub's folder is looked up with one variable set (to a folder under the test's), or none.
HUB_ENVS = {"TORCH_HOME": ("TORCH_HOME", "th"), "XDG_CACHE_HOME": ("XDG_CACHE_HOME", "xdg"), "default": None}


def to_numpy(x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


def layer_table(model: keras.Model) -> list[tuple]:
    """Each layer's name, class and weights (paths and shapes), the input layer left out
    (its name is a global counter's)."""
    return [(layer.name, type(layer).__name__, [(w.path, tuple(w.shape)) for w in layer.weights])
            for layer in model.layers[1:]]


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """KERAS_HOME and TORCH_HOME in temporary folders for the whole module: a conversion is
    made once and reused by the later tests, as it would be across runs."""
    root = tmp_path_factory.mktemp("caches")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KERAS_HOME", str(root / "keras"))
        patch.setenv("TORCH_HOME", str(root / "torch"))
        patch.delenv("XDG_CACHE_HOME", raising=False)
        yield root


# Run by `torch_reference` as `python -c TORCH_REFERENCE OUT HUB_ENVS SIZES...`: a random torchvision
# ResNet50 in eval mode whose BatchNorm layers have non-trivial statistics, scales and offsets,
# saved as a state dict with its logits on OUT/images_<size>.npy; a ResNet18's and an
# incomplete state dict; torch.hub's folder under `HUB_ENVS`; torchvision's URLs.
TORCH_REFERENCE = """
import json, os, sys
from pathlib import Path
try:
    import numpy as np, torch, torchvision
except Exception as e:
    print(f"{type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(3)
out, envs, sizes = Path(sys.argv[1]), json.loads(sys.argv[2]), [int(s) for s in sys.argv[3:]]
torch.manual_seed(0)
net = torchvision.models.resnet50()
for module in net.modules():
    if isinstance(module, torch.nn.BatchNorm2d):
        module.momentum = None  # cumulative averages: the statistics of all the passes below
        torch.nn.init.uniform_(module.weight, 0.5, 1.5)
        torch.nn.init.uniform_(module.bias, -0.2, 0.2)
net.train()
with torch.no_grad():
    for _ in range(3):
        net(torch.randn(4, 3, 64, 64) * 1.5 + 0.2)
net.eval()
state = net.state_dict()
torch.save(state, out / "resnet50.pth")
with torch.no_grad():
    for size in sizes:
        images = np.load(out / f"images_{size}.npy")
        np.save(out / f"logits_{size}.npy", net(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy())
np.savez(out / "arrays.npz", **{k: state[k].numpy() for k in ("layer3.5.conv3.weight", "layer1.0.bn2.running_mean")})
torch.save(torchvision.models.resnet18().state_dict(), out / "resnet18.pth")
del state["layer3.2.bn2.running_var"]
state["layer5.0.conv1.weight"] = state["conv1.weight"]
torch.save(state, out / "incomplete.pth")
hub = {}
for name, env in envs.items():
    for key in ("TORCH_HOME", "XDG_CACHE_HOME"):
        os.environ.pop(key, None)
    if env:
        os.environ[env[0]] = str(out / env[1])
    hub[name] = torch.hub.get_dir()
urls = {m: torchvision.models.ResNet50_Weights[m].url for m in ("IMAGENET1K_V1", "IMAGENET1K_V2")}
(out / "facts.json").write_text(json.dumps({"hub": hub, "urls": urls}))
"""


@pytest.fixture(scope="module")
def torch_reference(caches, phantoms, tmp_path_factory) -> Path:
    """The folder `TORCH_REFERENCE` wrote, its ResNet50 state dict already converted."""
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed")
    out = tmp_path_factory.mktemp("torch")
    for size in SIZES:
        np.save(out / f"images_{size}.npy", phantom_batch(phantoms, size))
    result = subprocess.run([sys.executable, "-c", TORCH_REFERENCE, str(out), json.dumps(HUB_ENVS), *map(str, SIZES)],
                            capture_output=True, text=True, timeout=300)
    if result.returncode == 3:
        pytest.skip(f"torchvision cannot be imported: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr[-3000:]
    pth = out / "resnet50.pth"
    assert resolve_backbone_weights(str(pth)) == str(pth)  # converts
    return out


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("phantoms")
    make_demo_data(root, train_per_class=1, test_per_class=0)
    return sorted((root / "Training").rglob("*.jpg"))


def phantom_batch(files: list[Path], size: int) -> np.ndarray:
    """The demo phantoms as the model sees them with torchvision's preprocessing (NHWC)."""
    return normalize(np.stack([decode_and_resize(str(f), size) for f in files]), "imagenet")


# --- the architecture ------------------------------------------------------------------


def test_the_v1_builder_is_keras_applications_resnet50_layer_for_layer():
    """Same layers, order, configs and, from one seed, the same initial weights."""
    keras.utils.set_random_seed(3)
    reference = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(64, 64, 3))
    keras.utils.set_random_seed(3)
    ours = resnet50(KERAS_V1, 64)
    assert layer_table(ours) == layer_table(reference)
    assert [layer.get_config() for layer in ours.layers[1:]] == [layer.get_config() for layer in reference.layers[1:]]
    for a, b in zip(ours.weights, reference.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


def test_a_legacy_h5_file_like_keras_imagenet_loads_by_layer_order(tmp_path):
    """Keras' ImageNet file is a legacy .h5 matched by layer order: one written from
    `keras.applications.ResNet50` loads into the v1 backbone and gives its outputs."""
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    keras.utils.set_random_seed(11)
    reference = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "resnet50_notop.h5"
    with h5py.File(path, "w") as f:
        save_weights_to_hdf5_group(f, reference)
    backbone = build_backbone(32, str(path))
    x = np.random.default_rng(0).normal(0, 50, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(to_numpy(backbone(x)), to_numpy(reference(x)))


def test_v15_downsamples_in_the_3x3_convolution_with_torchvision_settings():
    backbone = build_backbone(64, "none", arch=TORCHVISION_V15)
    for stage in ("conv3", "conv4", "conv5"):
        assert backbone.get_layer(f"{stage}_block1_1_conv").strides == (1, 1)
        assert backbone.get_layer(f"{stage}_block1_2_conv").strides == (2, 2)
        assert backbone.get_layer(f"{stage}_block1_2_conv").padding == "valid"  # after an explicit 1-pixel pad
        assert backbone.get_layer(f"{stage}_block1_0_conv").strides == (2, 2)
    assert backbone.get_layer("conv2_block1_1_conv").strides == (1, 1)
    convs = [layer for layer in backbone.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 53 and not any(layer.use_bias for layer in convs)
    assert {layer.epsilon for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)} == {1e-5}
    assert backbone.output.shape == (None, 2, 2, 2048)
    v1 = build_backbone(64, "none")
    assert residual_blocks(backbone) == residual_blocks(v1)
    for name in CUT_LAYERS.values():
        assert backbone.get_layer(name).output.shape == v1.get_layer(name).output.shape


@pytest.mark.parametrize("name, cut", [("resnet50", "conv4"), ("hybrid", "conv3")])
def test_v15_models_build_cut_and_unfreeze_like_v1(name, cut):
    spec = ModelSpec(name, cut=cut, head_blocks=1, head_filters=16, arch=TORCHVISION_V15)
    model = build_model(spec, 4, 33)
    assert to_numpy(model(np.zeros((1, 33, 33, 3), np.float32))).shape == (1, 4)
    assert set_backbone_trainable(model, 2)[-1] == ("conv5_block3" if name == "resnet50" else "conv3_block4")
    if name == "hybrid":
        assert model.get_layer("resnet50").output.shape[1:] == (5, 5, 512)


def test_every_declared_arch_is_accepted_and_an_unknown_one_refused_where_it_is_chosen():
    for arch in ARCHS:  # what --arch offers (click.Choice(ARCHS)) is what the model and the weights take
        assert ModelSpec(arch=arch).arch == arch and resolve_arch(arch, "none") == arch
    with pytest.raises(ValueError, match="arch must be one of"):
        ModelSpec(arch="resnet50-v2")
    with pytest.raises(WeightsError, match="arch must be one of"):
        resolve_arch("resnet50-v2", "none")


# --- which weights fit which architecture ----------------------------------------------


@pytest.mark.parametrize("arch, weights, expected", [
    (None, "torchvision", TORCHVISION_V15), (None, "torchvision-v2", TORCHVISION_V15),
    (None, "/some/resnet50.pth", TORCHVISION_V15), (None, "imagenet", KERAS_V1), (None, "none", KERAS_V1),
    (TORCHVISION_V15, "none", TORCHVISION_V15), (TORCHVISION_V15, "backbone.weights.h5", TORCHVISION_V15),
])
def test_weights_imply_the_arch(arch, weights, expected):
    assert resolve_arch(arch, weights) == expected


@pytest.mark.parametrize("arch, weights", [(KERAS_V1, "torchvision"), (KERAS_V1, "a.pth"),
                                           (TORCHVISION_V15, "imagenet")])
def test_weights_of_the_other_arch_are_refused_before_anything_loads(arch, weights):
    with pytest.raises(WeightsError) as error:
        build_classifier(4, 32, weights=weights, arch=arch)
    assert f"do not fit --arch {arch}" in one_line(error)


# --- where torchvision's files are, offline ----------------------------------------------


@pytest.mark.parametrize("name, file_name", [("torchvision", "resnet50-0676ba61.pth"),
                                              ("torchvision-v2", "resnet50-11ad3fa6.pth")])
def test_uncached_torchvision_weights_offline_fail_fast_naming_file_folder_and_url(name, file_name, tmp_path):
    """In a fresh interpreter, as the command line would: no torch imported, well under a second."""
    code = ("import sys, time; import model.weights as w; w._can_reach = lambda *a, **k: False; t = time.perf_counter()\n"
            f"try: w.resolve_backbone_weights({name!r})\n"
            "except w.WeightsError as e: print(e)\n"
            "print(time.perf_counter() - t, 'torch' in sys.modules, 'keras' in sys.modules)")
    env = dict(cli_env(active_backend()), TORCH_HOME=str(tmp_path / "torch-home"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                            check=True, timeout=60)
    message, timing = result.stdout.strip().splitlines()
    folder = tmp_path / "torch-home" / "hub" / "checkpoints"
    assert file_name in message and f"in {folder}/" in message
    assert f"https://download.pytorch.org/models/{file_name}" in message and "--weights none" in message
    seconds, torch_loaded, keras_loaded = timing.split()
    assert float(seconds) < 2 and torch_loaded == keras_loaded == "False"


def test_train_with_uncached_torchvision_weights_stops_in_one_line(demo_dir, tmp_path, monkeypatch):
    tried = go_offline(monkeypatch)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # nothing cached
    out = tmp_path / "run"
    start = time.perf_counter()
    result = run_cli("train", "--data-dir", str(demo_dir), "--weights", "torchvision", "--out", str(out))
    assert time.perf_counter() - start < 30
    assert result.exit_code == 2 and tried, result.output[-2000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "resnet50-0676ba61.pth" in lines[0], result.output[-2000:]
    assert "Traceback" not in result.output
    assert not out.exists()


def test_a_corrupt_cached_torchvision_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"PK\x03\x04 cut short")
    monkeypatch.setattr(weights_module, "_can_reach", lambda *a, **k: pytest.fail("network used"))
    with pytest.raises(WeightsError) as error:
        resolve_backbone_weights("torchvision-v2")
    message = one_line(error)
    assert str(cached) in message and "published hash (SHA-256 11ad3fa6" in message


@pytest.mark.parametrize("env", HUB_ENVS)
def test_the_hub_folder_is_torch_hubs(env, torch_reference, monkeypatch):
    for key in ("TORCH_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(key, raising=False)
    if HUB_ENVS[env]:
        key, value = HUB_ENVS[env]
        monkeypatch.setenv(key, str(torch_reference / value))
    hub = json.loads((torch_reference / "facts.json").read_text())["hub"][env]
    assert weights_module.torch_hub_dir() == Path(hub)


def test_the_file_names_are_torchvisions(torch_reference):
    urls = json.loads((torch_reference / "facts.json").read_text())["urls"]
    for member, file_name in weights_module.TORCHVISION_WEIGHTS.values():
        assert urls[member] == weights_module.TORCHVISION_URL + file_name


def test_the_converter_module_imports_no_backend():
    code = "import sys, model.torchvision_convert; print(sorted(m for m in ('keras', 'torch') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]"


# --- converting a state dict ------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_converted_weights_give_torchvisions_logits(torch_reference, phantoms, size):
    images = phantom_batch(phantoms, size)
    expected = np.load(torch_reference / f"logits_{size}.npy")
    model = resnet50(TORCHVISION_V15, size, include_top=True, classifier_activation=None)
    load_converted(model, converted_torchvision_file(torch_reference / "resnet50.pth"))
    logits = to_numpy(model(images, training=False))
    difference = np.abs(logits - expected).max()
    scale = np.abs(expected).max()
    print(f"{active_backend()} {size}px: max |logit| {scale:.3g}, max |diff| {difference:.3g}, "
          f"relative {difference / scale:.3g}")
    assert logits.shape == (len(phantoms), 1000) and scale > 1e-2  # not a degenerate all-zero output
    assert difference <= RELATIVE_TOLERANCE * scale
    np.testing.assert_array_equal(logits.argmax(1), expected.argmax(1))


def test_the_converted_file_keeps_fc_and_the_backbone_loads_it(torch_reference):
    pth = torch_reference / "resnet50.pth"
    with h5py.File(converted_torchvision_file(pth), "r") as f:
        assert f["predictions/0"].shape == (2048, 1000)
        assert f.attrs["source_sha256"] == file_sha256(pth)
    backbone = build_backbone(64, str(pth), cut="conv4", arch=TORCHVISION_V15)
    arrays = np.load(torch_reference / "arrays.npz")
    np.testing.assert_array_equal(to_numpy(backbone.get_layer("conv4_block6_3_conv").kernel),
                                  arrays["layer3.5.conv3.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(to_numpy(backbone.get_layer("conv2_block1_2_bn").moving_mean),
                                  arrays["layer1.0.bn2.running_mean"])


def test_named_weights_come_from_the_hub_cache_and_the_converted_copy(torch_reference, caches, monkeypatch):
    """`--weights torchvision` offline with the file cached: the hash in its name is checked,
    the conversion already made is reused (no subprocess, no network)."""
    pth = torch_reference / "resnet50.pth"
    file_name = f"resnet50-{file_sha256(pth)[:8]}.pth"
    cached = caches / "torch" / "hub" / "checkpoints" / file_name
    cached.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(pth, cached)
    monkeypatch.setitem(weights_module.TORCHVISION_WEIGHTS, "torchvision", ("IMAGENET1K_V1", file_name))
    monkeypatch.setattr(weights_module, "_can_reach", lambda *a, **k: pytest.fail("network used"))
    monkeypatch.setattr(weights_module, "_convert", lambda spec: pytest.fail("converted again"))
    assert resolve_backbone_weights("torchvision") == str(cached)
    model = build_classifier(4, 64, weights="torchvision", arch=TORCHVISION_V15)
    reference = build_backbone(64, str(pth), arch=TORCHVISION_V15)
    for a, b in zip(model.get_layer("resnet50").weights, reference.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


def test_other_architectures_and_incomplete_state_dicts_are_refused_in_one_line(torch_reference):
    resnet18 = torch_reference / "resnet18.pth"
    with pytest.raises(WeightsError) as error:
        resolve_backbone_weights(str(resnet18))
    message = one_line(error)
    assert f"{resnet18} is not a torchvision ResNet50 state dict (basic blocks without conv3" in message
    assert "missing layer1.0.downsample.0.weight" in message and "(165 in all)" in message
    assert "wrong shapes layer1.0.conv1.weight (64, 64, 3, 3) (not (64, 64, 1, 1))" in message
    with pytest.raises(WeightsError) as error:
        resolve_backbone_weights(str(torch_reference / "incomplete.pth"))
    assert "missing layer3.2.bn2.running_var; unexpected layer5.0.conv1.weight" in one_line(error)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_a_file_that_is_no_state_dict_is_refused_in_one_line(caches, tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a zip file at all" * 100)
    with pytest.raises(WeightsError) as error:
        resolve_backbone_weights(str(garbage))
    assert f"{garbage} is not a readable PyTorch state dict" in one_line(error)


def test_without_torch_a_state_dict_is_refused_saying_what_to_install(caches, tmp_path, monkeypatch):
    pth = tmp_path / "weights.pth"
    pth.write_bytes(b"anything")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real_find_spec(name, *a))
    with pytest.raises(WeightsError) as error:
        resolve_backbone_weights(str(pth))
    assert "needs torch: pip install -r requirements/runtime.lock" in one_line(error)
    with pytest.raises(WeightsError) as error:
        resolve_backbone_weights(str(tmp_path / "absent.pth"))
    assert "does not exist" in one_line(error)


def test_a_damaged_converted_file_is_converted_again(torch_reference):
    """The conversion is named by the .pth file's SHA-256 and checked when reused."""
    pth = torch_reference / "resnet50.pth"
    converted = converted_torchvision_file(pth)
    converted.write_bytes(converted.read_bytes()[:4096])  # e.g. a full disk
    assert resolve_backbone_weights(str(pth)) == str(pth)
    load_backbone_weights(resnet50(TORCHVISION_V15, 32), str(pth))
