"""The training loss: sparse cross-entropy from logits, with optional label smoothing.

Keras' `SparseCategoricalCrossentropy` has no `label_smoothing` (only the one-hot
`CategoricalCrossentropy` does), and the pipeline's labels are class indices; so the
smoothed loss is written here once, in `keras.ops`, the same code on every backend.
"""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="brain_mri")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Cross-entropy against `(1 - smoothing) * one_hot(label) + smoothing / num_classes`,
    from logits and integer labels: `CategoricalCrossentropy(label_smoothing=...)` without
    building the one-hot targets."""

    def __init__(self, smoothing: float, name: str = "smoothed_sparse_crossentropy", **kwargs) -> None:
        super().__init__(name=name, **kwargs)
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = smoothing

    def call(self, y_true, y_pred):
        ops = keras.ops
        log_probs = ops.log_softmax(ops.cast(y_pred, "float32"), axis=-1)
        labels = ops.cast(ops.reshape(y_true, (-1, 1)), "int32")
        true_class = -ops.squeeze(ops.take_along_axis(log_probs, labels, axis=-1), axis=-1)
        uniform = -ops.mean(log_probs, axis=-1)  # the cross-entropy against 1/num_classes everywhere
        return (1.0 - self.smoothing) * true_class + self.smoothing * uniform

    def get_config(self) -> dict:
        return {**super().get_config(), "smoothing": self.smoothing}


def training_loss(label_smoothing: float = 0.0) -> keras.losses.Loss:
    """Keras' own sparse cross-entropy from logits, or the smoothed one when asked for."""
    if label_smoothing:
        return SmoothedSparseCrossentropy(label_smoothing)
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
