import hashlib
from pathlib import Path

import keras
import numpy as np
import pytest

from data.augment import AugmentConfig
from data.discovery import Example, make_splits
from data.loader import DecodedCache, EpochSync, MRIBatches, iterate_epoch, pipeline_hash, scan_examples


@pytest.fixture(scope="module")
def train_examples(demo_dir):
    return make_splits(demo_dir, val_split=0.0).train


def batches(examples, workers=2, cache=True, **kwargs):
    return MRIBatches(
        examples, 32, 8, "caffe", AugmentConfig(), shuffle=True, seed=7,
        cache=DecodedCache() if cache else None, workers=workers, **kwargs,
    )


def test_batch_shapes_dtypes_and_labels(train_examples):
    data = batches(train_examples)
    assert len(data) == 4  # 32 examples / 8
    images, labels = data.batch(0, 0)
    assert images.shape == (8, 32, 32, 3) and images.dtype == np.float32
    assert labels.dtype == np.int32
    order = data.order(0)[:8]
    np.testing.assert_array_equal(labels, [train_examples[i].label for i in order])


def test_same_epoch_same_bytes_other_epoch_other_bytes(train_examples):
    a, b = batches(train_examples), batches(train_examples, cache=False)
    np.testing.assert_array_equal(a.batch(1, 2)[0], b.batch(1, 2)[0])
    assert not np.array_equal(a.batch(1, 2)[0], a.batch(2, 2)[0])
    assert sorted(a.order(0)) == list(range(len(train_examples)))
    assert not np.array_equal(a.order(0), a.order(1))


def test_an_epoch_can_be_reproduced_on_its_own(train_examples):
    data = batches(train_examples)
    first = [x.copy() for x, _ in (data.batch(e, 0) for e in range(3))]
    fresh = batches(train_examples)
    np.testing.assert_array_equal(fresh.batch(2, 0)[0], first[2])


def test_worker_count_does_not_change_the_bytes(train_examples):
    hashes = {pipeline_hash(batches(train_examples, workers=w), epoch=1, num_batches=4) for w in (0, 1, 2, 4)}
    assert len(hashes) == 1


def test_iterate_epoch_yields_the_batches_in_order(train_examples):
    data = batches(train_examples, workers=3)
    got = list(iterate_epoch(data, epoch=2))
    assert len(got) == len(data)
    for i, (images, labels) in enumerate(got):
        expected = data.batch(2, i)
        np.testing.assert_array_equal(images, expected[0])
        np.testing.assert_array_equal(labels, expected[1])


class RecordBatches(keras.layers.Layer):
    """Records a hash of every batch the model is called on while training."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen: list[str] = []

    def call(self, inputs, training=None):
        if training and not isinstance(inputs, keras.KerasTensor):
            self.seen.append(hashlib.sha256(np.asarray(keras.ops.convert_to_numpy(inputs)).tobytes()).hexdigest())
        return inputs


@pytest.mark.parametrize("workers", [0, 3])
def test_fit_trains_on_exactly_the_pipeline_batches_of_each_epoch(train_examples, workers):
    """What reaches the model in `fit`, epoch by epoch and over two `fit` calls (the
    hybrid's phases), is `batch(e, i)`: the same on every backend and worker count."""
    data = batches(train_examples, workers=workers)
    recorder = RecordBatches()
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(recorder(inputs))
    model = keras.Model(inputs, keras.layers.Dense(4)(x))
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True), run_eagerly=True)
    model.fit(data, epochs=2, shuffle=False, verbose=0, callbacks=[EpochSync(data)])
    model.fit(data, initial_epoch=2, epochs=3, shuffle=False, verbose=0, callbacks=[EpochSync(data)])
    expected = [hashlib.sha256(data.batch(e, i)[0].tobytes()).hexdigest() for e in range(3) for i in range(len(data))]
    assert recorder.seen == expected


def test_on_epoch_end_advances_the_epoch(train_examples):
    data = batches(train_examples, epoch=3)
    np.testing.assert_array_equal(data[0][0], data.batch(3, 0)[0])
    data.on_epoch_end()
    np.testing.assert_array_equal(data[0][0], data.batch(4, 0)[0])


def test_evaluation_batches_are_in_file_order_and_unaugmented(train_examples):
    data = MRIBatches(train_examples, 32, 8, "caffe")
    np.testing.assert_array_equal(data.batch(0, 0)[0], data.batch(5, 0)[0])
    np.testing.assert_array_equal(data.order(3), np.arange(len(train_examples)))


def test_scan_skips_and_reports_unreadable_files(train_examples, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    examples = [*train_examples[:3], Example(str(bad), 0), train_examples[3]]
    cache = DecodedCache()
    good, skipped = scan_examples(examples, 32, cache, workers=2)
    assert good == [*train_examples[:3], train_examples[3]]
    assert skipped == [(str(bad), skipped[0][1])] and "cannot decode" in skipped[0][1]
    assert len(cache) == 4 and cache.nbytes == 4 * 32 * 32 * 3


def test_a_file_broken_after_the_scan_does_not_stop_the_epoch(train_examples, tmp_path):
    victim = tmp_path / "later.jpg"
    victim.write_bytes(Path(train_examples[0].path).read_bytes())
    data = MRIBatches([Example(str(victim), 0), *train_examples[1:8]], 32, 8, "caffe")
    victim.write_bytes(b"")
    images, _ = data.batch(0, 0)
    assert data.failed and data.failed[0][0] == str(victim)
    from data.augment import normalize

    np.testing.assert_array_equal(images[0], normalize(np.zeros((1, 32, 32, 3), np.uint8), "caffe")[0])
