"""The models: the plain ResNet50 classifier and the hybrid (ResNet50 cut + custom CNN head),
on Keras' ResNet50 (v1) or torchvision's (v1.5) backbone (`model.resnet`).

`model.weights`, `model.spec` and `model.factory` do not import Keras, so options can be
checked before a backend loads; the builders are imported on first use for the same reason.

May import: `errors`, `checksums`, `markdown_tables`; never `data` or any package above.
"""

from model.factory import build_model
from model.spec import ARCHS, CUTS, MODELS, ModelSpec
from model.weights import (
    WeightsError,
    check_weights_file,
    load_initial_weights,
    resolve_arch,
    resolve_backbone_weights,
)

__all__ = [
    "ARCHS",
    "CUTS",
    "MODELS",
    "ModelSpec",
    "WeightsError",
    "build_classifier",
    "build_hybrid",
    "build_model",
    "check_weights_file",
    "load_initial_weights",
    "resolve_arch",
    "resolve_backbone_weights",
]


def __getattr__(name: str):
    if name == "build_classifier":
        from model.classifier import build_classifier

        return build_classifier
    if name == "build_hybrid":
        from model.hybrid import build_hybrid

        return build_hybrid
    raise AttributeError(f"module 'model' has no attribute {name!r}")
