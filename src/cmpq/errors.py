"""The exception and warning types users see.

Every failure caused by the user's input (a bad path, an impossible option, a
model that cannot be reached) is raised as :class:`CmpqError` with a message
that says what is wrong and what to do. The CLI prints that message on one
line and exits non-zero; anything else is a bug and keeps its traceback.

Library messages name parameters as the Python API spells them, between
backquotes (`` `bits` ``, `` `outliers_act` ``); the CLI prints its own flags
(``--bits``, ``--outliers-act``) in their place.
"""

from __future__ import annotations


class CmpqError(Exception):
    """A user-facing error: the message is complete and actionable."""


class CmpqWarning(UserWarning):
    """Something the user should know that did not stop the work (the CLI prints
    it as one ``warning: ...`` line)."""
