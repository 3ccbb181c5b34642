"""Errors a user can cause. The CLI prints them as one line and exits with code 2; tracebacks are for bugs."""

from __future__ import annotations

from collections.abc import Iterable


class SleepbotError(Exception):
    """A problem with the user's input: a bad name, value, shape or file. The message is one line."""


class ConfigError(SleepbotError, ValueError):
    """A config key, value or type that is not valid."""


def unknown_name(kind: str, name: object, valid: Iterable[str]) -> SleepbotError:
    """Build the one-line error for a name that is not in a registry."""
    return SleepbotError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(valid))}")
