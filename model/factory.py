"""`build_model`: the one place that turns a `ModelSpec` into a Keras model.

It lives apart from `model.spec` so that the spec module stays free of Keras and of the
builders (which import the spec's constants): no import cycle. The builders are imported
on first use, so importing this module does not load Keras either.
"""

from __future__ import annotations

from model.spec import NO_WEIGHTS, ModelSpec


def build_model(spec: ModelSpec, num_classes: int, image_size: int, weights: str = NO_WEIGHTS):
    """Builds the model `spec` names, with every layer trainable, in `spec.precision`: the dtype
    policy is set here, before any layer exists (a layer takes the policy at creation), and the
    logits layer stays float32 in any policy (see `model.classifier.classification_head`)."""
    import keras

    keras.mixed_precision.set_dtype_policy(spec.precision)
    if spec.name == "hybrid":
        from model.hybrid import build_hybrid

        return build_hybrid(
            num_classes, image_size, weights, spec.cut, spec.head_blocks, spec.head_filters, spec.se,
            spec.dropout, spec.bn_momentum, spec.dropout_seed, spec.arch,
        )
    from model.classifier import build_classifier

    return build_classifier(
        num_classes, image_size, weights, dropout=spec.dropout, bn_momentum=spec.bn_momentum,
        dropout_seed=spec.dropout_seed, arch=spec.arch,
    )
