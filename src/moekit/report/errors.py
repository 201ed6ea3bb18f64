"""The one error type of ``moekit.report``."""

from __future__ import annotations

from moekit.errors import UserError


class ReportError(UserError):
    """Report inputs are missing, unreadable or of the wrong kind, or there is nothing to report."""
