"""Bad-input errors, lowest layer: each message says what is wrong and how to fix it.

The CLI turns any InputError into one line on stderr and exit code 2.
"""


class InputError(ValueError):
    """Bad input from the user: a file, a flag, a config value, a run directory."""


class ConfigError(InputError):
    """A bad configuration value or key."""


class DataError(InputError):
    """Bad or missing data."""


class CheckpointError(InputError):
    """A missing, foreign or unreadable checkpoint."""


class RunDirError(InputError):
    """A run directory that cannot be used as asked."""
