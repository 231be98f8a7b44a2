"""The one exception type users see: the CLI prints its message without a traceback."""


class SmallCoderError(Exception):
    """A problem with the user's input (file, field, value), explained in the message."""
