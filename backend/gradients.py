"""Gradients each framework computes its own way: the loss gradients parity compares, and
the input gradients Grad-CAM needs."""

from __future__ import annotations

from backend.parallel import on_first_replica
from backend.selection import BackendError


def loss_and_gradients(model, images, labels, loss_fn) -> tuple:
    """One training-mode forward and backward pass, eagerly, on the active backend.

    Returns `(logits, loss, gradients)`, the gradients in the order of
    `model.trainable_variables`. BatchNormalization uses the batch statistics and
    updates its moving averages, as in a `fit` step.
    """
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        if tf.distribute.has_strategy() and tf.distribute.in_cross_replica_context():  # see "Data parallelism"
            return on_first_replica(loss_and_gradients, model, images, labels, loss_fn)
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = loss_fn(labels, logits)
        return logits, loss, tape.gradient(loss, model.trainable_variables)
    if backend == "torch":
        import torch

        for v in model.trainable_variables:
            v.value.grad = None
        with torch.enable_grad():
            logits = model(images, training=True)
            loss = loss_fn(labels, logits)
            loss.backward()
        return logits.detach(), loss.detach(), [v.value.grad for v in model.trainable_variables]
    if backend == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        def compute_loss(trainable_values):
            logits, updated = model.stateless_call(trainable_values, non_trainable, images, training=True)
            return loss_fn(labels, logits), (logits, updated)

        (loss, (logits, updated)), grads = jax.value_and_grad(compute_loss, has_aux=True)(trainable)
        for variable, value in zip(model.non_trainable_variables, updated, strict=True):
            variable.assign(value)
        return logits, loss, grads
    raise BackendError(f"no gradient code for backend {backend!r}")


def outputs_and_input_gradients(model, inputs, weights) -> tuple:
    """An inference-mode forward pass and the gradient of `sum(outputs * weights)` with
    respect to the inputs, with the active backend's own autodiff.

    `weights` has the outputs' shape (e.g. a one-hot row per image selects the score whose
    gradient is wanted); the images of a batch are independent in inference mode, so each
    row of the gradient belongs to its own image. Returns NumPy `(outputs, gradients)`.
    """
    import keras
    import numpy as np

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.convert_to_tensor(inputs)
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs = model(x, training=False)
            score = tf.reduce_sum(outputs * tf.convert_to_tensor(weights, outputs.dtype))
        return np.asarray(outputs), np.asarray(tape.gradient(score, x))
    if backend == "torch":
        import torch

        x = keras.ops.convert_to_tensor(inputs).detach().requires_grad_(True)  # on keras' device
        with torch.enable_grad():
            outputs = model(x, training=False)
            score = (outputs * keras.ops.convert_to_tensor(weights, outputs.dtype)).sum()
            (gradients,) = torch.autograd.grad(score, x)
        return outputs.detach().cpu().numpy(), gradients.cpu().numpy()
    if backend == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        def score(x):
            outputs, _ = model.stateless_call(trainable, non_trainable, x, training=False)
            return (outputs * weights).sum(), outputs

        (_, outputs), gradients = jax.value_and_grad(score, has_aux=True)(jax.numpy.asarray(inputs))
        return np.asarray(outputs), np.asarray(gradients)
    raise BackendError(f"no gradient code for backend {backend!r}")


def training_forward(model, images) -> None:
    """A training-mode forward pass, eagerly, that records no gradients: BatchNormalization
    normalises with the batch statistics and updates its moving averages (precise BatchNorm)."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        if tf.distribute.has_strategy() and tf.distribute.in_cross_replica_context():  # as loss_and_gradients
            return on_first_replica(training_forward, model, images)
    if backend == "torch":
        import torch

        with torch.no_grad():  # eager torch would otherwise keep the whole graph for a backward pass
            model(images, training=True)
        return None
    model(images, training=True)
    return None
