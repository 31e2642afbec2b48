"""The one model definition: an ImageNet-pretrainable ResNet50 classifier."""

from model.classifier import build_classifier
from model.weights import WeightsError, load_initial_weights, resolve_backbone_weights

__all__ = ["WeightsError", "build_classifier", "load_initial_weights", "resolve_backbone_weights"]
