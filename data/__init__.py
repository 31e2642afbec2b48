"""The one, framework-neutral input pipeline: discovery, decoding, augmentation, batches, the
duplicate audit and the record of a run's data. Its defaults are declared in `data` (its `__init__`).

May import: `errors`, `checksums`, `markdown_tables`; never `model` or any package above (the same bytes reach the
model on every backend, whatever else is loaded). Only `data.loader` imports Keras (for
`keras.utils.PyDataset`).

The pipeline's defaults are declared here, once: its signatures (`data.loader`, `data.audit`,
`data.discovery.make_splits`), the use of a finished run (`inference`) and the training options
(`training.config.TrainConfig`) take theirs from these; `tests/test_defaults.py` fails when one of
them states another value.
"""

BATCH_SIZE = 32  # images per training step and per evaluation batch (--batch-size)
WORKERS = 2  # loader threads; 0 loads in the calling thread (--workers)
VAL_SPLIT = 0.1  # stratified fraction of Training held out for validation (--val-split)
TEST_SPLIT = 0.0  # without Testing/: fraction of Training held out as the test set (--test-split)
SEED = 0  # the splits' seed (--split-seed) and the batch order's and augmentation's (--seed)
