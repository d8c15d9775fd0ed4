"""The one exception type that `run.py` turns into a single line and exit status 2."""


class UserError(Exception):
    """Bad input from the user (config, data, run id, ...): say what is wrong and how to fix it."""
