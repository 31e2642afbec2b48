"""The training core: one run from a data folder to a complete run directory.

Options and their checks (`options`, `config`, `recipes`), the loop (`train`, `schedule`,
`precise_bn`, `callbacks`, `stability`, `metrics`; the loss lives in `schedule`) and the run directory
(`rundir`, `resume`).

May import: `backend`, `data`, `model`, `errors`, `checksums`, `markdown_tables`. Never `studies`, `inference`, `bench` or the
command line. `options`, `config`, `recipes`, `rundir` and `resume` import no framework: the
command line checks a run with them before a backend loads.
"""
