"""Using a finished run: load it (`run`: its model and settings, predictions for files),
`evaluate` it on a labelled split, explain it (`gradcam`), `export` it, `report` it as HTML.

May import: `training` (the run directory's files, metrics), `backend`, `data`, `model`,
`errors`, `checksums`, `markdown_tables`; never `studies`, `bench` or the command line.
"""
