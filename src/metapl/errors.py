"""The one exception type that the CLI turns into a one-line message and a non-zero exit code."""


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix, in one line.

    Library code raises it for anything a user can correct (a missing folder, an unknown model name, more labels than
    images); ``metapl.cli.main`` prints ``error: <message>`` to stderr and exits with status 2, without a traceback.
    """
