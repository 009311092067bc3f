"""The one exception type that means "the user gave us something wrong"."""


class InputError(ValueError):
    """Bad input: a config, a file, an argument or data. The CLI turns it into exit code 2."""
