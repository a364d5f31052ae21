"""Errors meant for the user: shown as one line, without a traceback (unless --debug)."""


class UserError(Exception):
    """Bad input or settings. The message names the file or key and says how to fix it."""

    # Under a launcher every rank raises it alike (the same settings; the same global values):
    # the main rank says it once and the others wait to be ended (translate/cli.py).
    same_on_every_rank = False


class ConfigError(UserError):
    """A recipe or flag is wrong: unknown key, wrong type, impossible value."""

    same_on_every_rank = True


class ImageError(UserError):
    """An image file cannot be used: unreadable, corrupt, too large, unsupported."""


class ModelError(UserError):
    """A model file cannot be used: wrong format, wrong architecture, truncated."""


class DataError(UserError):
    """The dataset cannot be used as given (missing folders, no images)."""
