"""The errors of a user's input (config or dataset): their message is all that is shown."""


class InputError(ValueError):
    """A user's input is wrong (config or dataset): the message says which key, file, row or taxon, and is all that
    is shown."""


class ConfigError(InputError):
    """A configuration value is wrong; the message names the key."""


class DatasetError(InputError):
    """The dataset or taxonomy is inconsistent; the message names the file and row or taxon."""
