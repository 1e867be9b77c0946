"""Errors a user can act on, and how they are shown (never as a traceback)."""

from __future__ import annotations

from pydantic import ValidationError


class UserError(Exception):
    """A problem with the user's input or environment; its message says what to change."""


def describe_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem, with the field path as it appears in the file."""
    lines = [f"{source}: {error.error_count()} problem(s):"]
    for item in error.errors():
        path = ".".join(str(p) for p in item["loc"]) or "(top level)"
        lines.append(f"  {path}: {item['msg']}")
    return "\n".join(lines)
