"""Everything that depends on which Keras backend is active, one module per concern; any
`if backend == ...` of the project belongs here and nowhere else.

- `selection`: which backend, checked before it loads; its environment and versions.
- `devices`: devices, peak memory, recognising out-of-memory errors.
- `gradients`: loss and input gradients, each framework its own way (parity, Grad-CAM).
- `determinism`: each framework's deterministic mode; seeding.
- `startup`: what a training process sets in its environment before the framework loads.
- `exports`: what `model.export` needs per format and backend.
- `parallel`: data parallelism through each framework's own engine (`--devices N`).
- `distribute`: what data parallelism means for the batches and callbacks, whatever the engine.

May import: `data`, `model`, `errors`, `checksums`, `markdown_tables`. Never the training core, studies, runs or the command line.
Every module but `distribute` imports no framework at module level.
"""
