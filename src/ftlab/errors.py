"""The one family of errors ftlab raises for bad input.

Every error a user can fix by changing a file, a config value, a model reference or a command-line argument is an
``InputError``; its message names the file, line or row, and field. The command line prints such an error as one
red line and exits with code 2 (``ftlab.cli``); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input: a config value, a data file, a suite, a model reference or a store the user pointed at."""


class ModelNotFoundError(InputError, RuntimeError):
    """A model reference cannot be resolved or loaded without a download."""
