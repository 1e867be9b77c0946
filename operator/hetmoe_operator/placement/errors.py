"""The one error the planner raises for input it cannot place.

Infeasible requests are a normal outcome of planning, not a bug: the error names the
binding constraint and says what to change, so callers print it without a traceback.
"""

from __future__ import annotations

from typing import Any, Literal

Constraint = Literal[
    "memory", "divisibility", "devices", "grade", "budget", "pins", "expert-load", "time"
]


class PlanningError(Exception):
    """No plan satisfies the request; ``constraint`` names what binds."""

    def __init__(
        self, constraint: Constraint, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.constraint: Constraint = constraint
        self.message = message
        self.details: dict[str, Any] = dict(details or {})

    def __str__(self) -> str:
        return self.message
