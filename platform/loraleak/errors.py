"""User-facing errors: one clear line naming the problem, never a traceback for bad input."""


class LoraleakError(Exception):
    """An error caused by the user's input or environment; the CLI prints it as one line."""


class ConfigError(LoraleakError):
    """A config file or value is invalid (unknown key, wrong type, missing path...)."""


class InputError(LoraleakError):
    """An input artifact is unusable (corrupt image, LoRA for another base, pickle file...)."""
