"""Errors spap raises for its users to act on (the CLI maps them to exit statuses)."""

from __future__ import annotations


class UsageError(ValueError):
    """A bad argument or input path, found before any work (``spap`` exits with status 2)."""
