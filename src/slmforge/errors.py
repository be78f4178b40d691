"""The one exception type users see: a single line that names the file, field or line at fault."""


class SlmforgeError(Exception):
    """A problem with the user's input (config, corpus, checkpoint, tokenizer).

    The CLI prints it as one line and exits with status 2; no traceback, nothing half-written.
    """


class ConfigError(SlmforgeError):
    """A config field is unknown, of the wrong type, or holds an impossible value."""
