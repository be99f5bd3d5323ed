"""The project's error for a user's mistake: a bad config value, bad input data, a missing, incomplete or
broken file. Its message names the config key or file and the fix.

``train.py`` and ``evaluate.py`` print it as one line (``error: ...``) and exit with status 1, without a
traceback (``HYDRA_FULL_ERROR=1`` shows it); any other exception is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A user's mistake; the message says which key or file, and what to do."""
