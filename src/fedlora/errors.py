"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class FedLoraError(Exception):
    """A problem with the user's input (config, data, files), reported without a traceback."""
