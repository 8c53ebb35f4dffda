"""The one exception base that means "the user can fix this": bad settings, config, data or environment.

The command line prints such an error as one ``tuneship: error: ...`` line (exit code 2); anything else is
a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error whose message names the setting, key, file or row to fix."""


class TransientError(RuntimeError):
    """A service failed or could not be reached (vLLM, MLflow, the S3 endpoint): the same call may pass later,
    so the flow retries the stage. Not a :class:`UserError`: nothing in the user's config or data is wrong."""
