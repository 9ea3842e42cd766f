"""User-facing errors."""


class NammError(ValueError):
    """Bad input or configuration. The message says what to fix; the CLI prints it without a traceback."""
