"""The failures a user can fix, as one family of exceptions.

The command line catches `KdslimError` and prints its message as one line with a non-zero exit
(`launch/cli.py`); anything else is a bug and keeps its traceback. Each message names what
is wrong (the key, the file, the value) and what to do about it.
"""

from __future__ import annotations


class KdslimError(Exception):
    """A problem with the user's input, files or run, with a message that says how to fix it."""

    exit_code = 1


class ConfigError(KdslimError, ValueError):
    """A configuration problem a user can fix by editing the named key."""

    exit_code = 2


class DataError(KdslimError, ValueError):
    """Bad input data: a missing directory, an empty class, an unreadable image."""

    exit_code = 2


class ModelFileError(KdslimError):
    """A model or weights file that is missing, truncated or not what it claims to be."""

    exit_code = 2


class CacheError(KdslimError, ValueError):
    """A cache that is missing, incomplete, corrupt, or made for other data or teachers."""


class TrainingError(KdslimError):
    """Training diverged (non-finite loss or weights); nothing is saved as a result."""


class StageError(KdslimError):
    """A stage cannot run now: an input is missing, or a resume would mix configurations."""
