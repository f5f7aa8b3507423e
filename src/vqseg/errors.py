"""The errors a user can cause and fix: the command line prints their message as one line and exits
with status 2; anything else is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(ValueError):
    """Base of every error the user can cause and fix (a bad file or setting)."""


class ConfigError(UserError):
    """A configuration file, override or name that cannot be turned into a valid run."""
