"""The one exception type users see.

Every failure caused by the user's input (a bad path, an impossible option, a
model that cannot be reached) is raised as :class:`CmpqError` with a message
that says what is wrong and what to do. The CLI prints that message on one
line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class CmpqError(Exception):
    """A user-facing error: the message is complete and actionable."""
