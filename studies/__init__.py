"""Studies over many runs: `compare` (a grid of runs over backends and factors), `reproduce`
(one factor at a time from seed-keras to seed-pytorch), `parity` (one step of one weights file
on every backend) and `stats` (intervals, McNemar, the bootstrap). Each run goes to a process
of its own backend through `processes.in_process`, which starts `worker` (never the command line).

May import: `training`, `inference`, `backend`, `data`, `model`, `errors`, `checksums`, `markdown_tables`; never the command line
or `bench`.
"""
