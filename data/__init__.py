"""The one, framework-neutral input pipeline: discovery, decoding, augmentation, batches, the
duplicate audit and the record of a run's data. Its defaults are declared in `data.defaults`.

May import: `errors`, `checksums`, `markdown_tables`; never `model` or any package above (the same bytes reach the
model on every backend, whatever else is loaded). Only `data.loader` imports Keras (for
`keras.utils.PyDataset`).
"""
