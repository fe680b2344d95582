"""The one exception type the CLI turns into a one-line message (no traceback)."""


class SegrewardError(ValueError):
    """A user-facing error: bad input, bad config, bad file. The message says what to do."""
