"""Precise BatchNorm: each BatchNormalization layer's moving mean and variance recomputed from
training batches through the final weights.

Why: the moving statistics are an exponential average over roughly the last 1/(1 - momentum)
steps, taken while the weights kept changing, so they trail the weights the run ends with.
`reproduce` found the BatchNorm-momentum step trains bit-identical weights yet moves the test
accuracy by -10.5 to +18.0 points: the moving averages, not the weights, decided those scores.
"Precise BN" (Wu and Johnson, "Rethinking 'Batch' in BatchNorm", 2021; fvcore's
`update_bn_stats`) replaces them with the equal-weight mean of the statistics of N batches
through the fixed weights, so two runs with the same weights score alike. `train --precise-bn N`
does it after every epoch, before the validation that picks the best checkpoint
(`PreciseBatchNormEachEpoch`; the last epoch's are the final weights'); `evaluate --precise-bn N`
does it to a finished run's weights.

How, with Keras' own update and on every backend alike: the model runs N batches in training
mode, eagerly, with each layer's momentum set to (k - 1) / k before batch k, so that after
batch k the moving mean is the mean of the k batch means (and the same for the variances, which
Keras averages as the biased batch variance it normalises with). Only the layers that
normalise with batch statistics in training (trainable ones) are recomputed: a frozen layer
trained on its moving statistics, and those are what its weights were fitted to.
"""

from __future__ import annotations

from collections.abc import Iterable

import keras
import numpy as np

from backend.gradients import training_forward
from data.loader import MRIBatches, iterate_epoch
from training.callbacks import restore_seed_states, seed_states


def batchnorm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """The BatchNormalization layers of `model` (nested models included) that train on batch statistics."""
    return [layer for layer in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]


def recompute_batchnorm_statistics(model: keras.Model, batches: Iterable[np.ndarray]) -> tuple[int, int]:
    """Sets every trainable BatchNormalization layer's moving mean and variance to the mean of
    its batch statistics over `batches` (float32 NHWC, as the model takes them), with the
    weights fixed. Returns `(batches used, layers recomputed)`; no batches leave the model as it was.

    The random generators (dropout's) are put back too: the forward passes run in training mode
    and would advance them, and a run that does this between epochs must then draw the same
    dropout masks, so train the same weights, as one that does not."""
    layers = batchnorm_layers(model)
    momenta = [layer.momentum for layer in layers]
    generators = seed_states(model)
    used = 0
    try:
        for images in batches:
            used += 1
            for layer in layers:
                layer.momentum = (used - 1) / used  # batch 1 replaces the old average; batch k weighs 1/k
            training_forward(model, images)
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
        restore_seed_states(model, generators)
    return used, len(layers) if used else 0


def recompute_after_epoch(model: keras.Model, train_batches: MRIBatches, trained_epochs: int,
                          batches: int) -> tuple[int, int]:
    """The batches precise BN takes for weights that trained `trained_epochs` epochs, in training
    (`train --precise-bn`, at each epoch's end) and after the fact (`evaluate
    --precise-bn`) alike: the first `batches` of the next epoch, from the run's own pipeline
    (augmented as in training, the same bytes on every backend). One place, so they stay the same
    computation. Returns `(batches used, layers recomputed)`."""
    images = (x for x, _ in iterate_epoch(train_batches, trained_epochs, limit=batches))
    return recompute_batchnorm_statistics(model, images)


class PreciseBatchNormEachEpoch(keras.callbacks.Callback):
    """`train --precise-bn N`, during training: at the end of every epoch, the moving statistics
    recomputed from the first N batches of the next epoch (`recompute_after_epoch`; the last
    epoch's are the final weights', recorded in `recomputed`), then the validation (fit is given
    none of its own), whose accuracy picks the best checkpoint. So the choice of best.weights.h5, that file and the resume
    checkpoint all hold the statistics their scores were read with. The weights do not change:
    in training mode BatchNorm normalises with the batch's own statistics, so the moving ones
    never reach a gradient (and the dropout generators are put back).

    Cost: N training-mode forward passes per epoch, run eagerly."""

    def __init__(self, train_batches: MRIBatches, val_batches: keras.utils.PyDataset | None, batches: int) -> None:
        super().__init__()
        self.train_batches, self.val_batches, self.batches = train_batches, val_batches, batches
        self.recomputed: dict | None = None  # the last: {"batches", "layers", "epoch"}, as metrics.json records it

    def on_epoch_end(self, epoch, logs=None):
        used, layers = recompute_after_epoch(self.model, self.train_batches, epoch + 1, self.batches)
        self.recomputed = {"batches": used, "layers": layers, "epoch": epoch + 1}
        if self.val_batches is not None and logs is not None:
            scores = self.model.evaluate(self.val_batches, verbose=0, return_dict=True)
            logs.update({f"val_{name}": float(value) for name, value in scores.items()})


def best_epoch_gets_it(best_epoch: int, phase_epochs: list[int]) -> bool:
    """Whether `evaluate --precise-bn --checkpoint best` can recompute the best epoch's statistics:
    only when it is from the last phase, whose trainable layers the rebuilt model has (an earlier
    phase trained other layers, and fitted the frozen ones' weights to their moving statistics)."""
    return best_epoch > sum(phase_epochs) - phase_epochs[-1]
