"""The one exception class of ``moekit.eval``."""

from __future__ import annotations

from moekit.errors import UserError


class EvalError(UserError):
    """An evaluation cannot run as asked: the message says what is wrong and what to do."""
