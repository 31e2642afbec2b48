"""The command line, one module per group of commands; `cli.py` gathers them into one group.

May import every other package (only inside a command's body where that package loads a
framework: options are checked before a backend loads); nothing imports `commands`.
"""
