"""Errors meant for the user: shown as one line, without a traceback (unless --debug)."""


class UserError(Exception):
    """Bad input or settings. The message names the file or key and says how to fix it."""


class ConfigError(UserError):
    """A recipe or flag is wrong: unknown key, wrong type, impossible value."""


class ImageError(UserError):
    """An image file cannot be used: unreadable, corrupt, too large, unsupported."""


class ModelError(UserError):
    """A model file cannot be used: wrong format, wrong architecture, truncated."""


class DataError(UserError):
    """The dataset cannot be used as given (missing folders, no images)."""
