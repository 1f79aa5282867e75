"""Errors a user can fix: the command line reports them in words (exit 2), never as a traceback.

Anything else that escapes a command is a defect of cdpflow and is shown with its traceback.
"""


class BadInput(ValueError):
    """An argument, a configuration value or an input file is not what the command needs."""
