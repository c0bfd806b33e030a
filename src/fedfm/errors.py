"""User-facing errors. The CLI prints these as one paragraph, without a traceback."""


class FedfmError(Exception):
    """Base of every error caused by user input (config, files, names)."""


class ConfigError(FedfmError):
    """A config key, value or combination is not allowed."""


class DataError(FedfmError):
    """A dataset is missing, corrupt, or does not fit the experiment."""


class ModelError(FedfmError):
    """A model name or path cannot be resolved or does not fit the task."""
