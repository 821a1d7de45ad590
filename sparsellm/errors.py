"""The one exception type the CLI turns into a one-line error and exit status 2."""


class UsageError(ValueError):
    """Bad input (a path, rate, pattern, architecture or corpus): reported without a traceback."""
