"""The package's own error types for bad input.

Every deliberate input check in the package (shapes, dtypes, NaN, values, files, formats) raises one of these, so
that a caller can tell "the input is wrong, and the message says how" from a bug: the command line turns these into
a one-line message and exit status 2, while any other exception keeps its traceback. They subclass the built-in
``ValueError`` / ``TypeError``, so code that catches those keeps working.
"""

from __future__ import annotations


class InputError(ValueError):
    """A value, shape, file or setting given to the package is unusable; the message names it and the fix."""


class InputTypeError(InputError, TypeError):
    """An argument has the wrong type (also a ``TypeError``)."""


class OutputError(OSError):
    """An output could not be written (a full disk, a file-size limit, a folder in use by another run); the message
    names the file or folder, and what is left there."""
