"""The one model definition: an ImageNet-pretrainable ResNet50 classifier.

`model.weights` does not import Keras, so weight options can be checked before
a backend loads; `build_classifier` is imported on first use for the same reason.
"""

from model.weights import WeightsError, check_weights_file, load_initial_weights, resolve_backbone_weights

__all__ = [
    "WeightsError",
    "build_classifier",
    "check_weights_file",
    "load_initial_weights",
    "resolve_backbone_weights",
]


def __getattr__(name: str):
    if name == "build_classifier":
        from model.classifier import build_classifier

        return build_classifier
    raise AttributeError(f"module 'model' has no attribute {name!r}")
