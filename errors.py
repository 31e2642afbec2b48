"""`UserInputError`: the one base class of the project's errors about what the user gave.

Options that do not fit, a dataset folder of the wrong layout, a weights file that is not
the one expected, an output folder that cannot be written: each module raises its own
subclass with a message that says what was found and what to do, and the command line
turns every one of them into that one line and exit code 2 (`cli._user_errors`). Nothing
here imports a backend, so these errors come before one loads.
"""


class UserInputError(Exception):
    """Bad input from the user: reported as one line, exit code 2, no traceback."""
