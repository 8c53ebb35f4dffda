"""The one exception base that means "the user can fix this": bad settings, config, data or environment.

The command line prints such an error as one ``tuneship: error: ...`` line (exit code 2); anything else is
a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error whose message names the setting, key, file or row to fix."""
