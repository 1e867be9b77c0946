"""Condition bookkeeping in the standard Kubernetes way."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Literal

from hetmoe_operator.api.reasons import CONDITION_TYPES, is_known
from hetmoe_operator.api.status import Condition


def rfc3339(moment: datetime) -> str:
    """Second-precision UTC timestamp, as Kubernetes writes them."""
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: Sequence[Condition],
    type_: str,
    status: Literal["True", "False", "Unknown"],
    reason: str,
    message: str,
    *,
    observed_generation: int,
    now: datetime,
) -> list[Condition]:
    """Conditions with ``type_`` replaced; lastTransitionTime moves only when the
    status flips (reason and message updates are not transitions)."""
    assert is_known(reason), f"reason {reason} missing from api.reasons"
    previous = next((c for c in conditions if c.type == type_), None)
    transition = rfc3339(now)
    if previous is not None and previous.status == status:
        transition = previous.last_transition_time
    updated = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message[:32768],
        observed_generation=observed_generation,
        last_transition_time=transition,
    )
    others = [c for c in conditions if c.type != type_]
    order = {t: i for i, t in enumerate(CONDITION_TYPES)}
    return sorted([*others, updated], key=lambda c: order.get(c.type, len(order)))


def condition(conditions: Sequence[Condition], type_: str) -> Condition | None:
    """The condition of ``type_``, if set."""
    return next((c for c in conditions if c.type == type_), None)
