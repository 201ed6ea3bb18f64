"""The one base class of every error a user can cause (a bad input, a missing file, a wrong option).

The command line maps each of these to a one-line message and exit status 2; anything else that
escapes is a bug in moekit, shown with its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem with what the user asked for or gave; the message says what is wrong and what to do."""
