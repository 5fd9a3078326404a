"""The one exception type that means "the user gave us something wrong" (CLI exit code 2)."""


class UserError(Exception):
    """Bad usage, config, model folder or input file. The message names the culprit."""


class ConfigError(UserError):
    """A config file or override that cannot be loaded or fails validation."""
