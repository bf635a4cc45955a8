"""The one error type the user is meant to see: something they can fix."""


class UserError(Exception):
    """A problem with the user's input, files or settings, phrased as one sentence to act on.

    The CLI prints it on one line and exits with code 2; anything else is a bug and keeps its
    traceback.
    """
