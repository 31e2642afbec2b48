"""Benchmarks: `train` (steady-state training speed and memory through the pipeline, from memory,
and native torchvision) and `pipeline` (the input pipeline against a tf.data baseline).

May import: `training`, `backend`, `data`, `model`, `errors`, `checksums`, `markdown_tables`; never `studies`, `inference` or
the command line.
"""
