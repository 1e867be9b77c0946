"""The trainer refuses plans it cannot run with a message naming the fix, before any
process group or schedule exists (torch's own error would come mid-start-up)."""

from __future__ import annotations

import pytest
from plan_factory import make_plan

from hetmoe_trainer.distributed import PlanError, validate_plan


def test_1f1b_needs_a_microbatch_per_stage() -> None:
    validate_plan(make_plan(pp=2, replicas=[(4, 2)]))
    with pytest.raises(PlanError, match="at least one microbatch per stage \\(pp 2\\), got 1"):
        validate_plan(make_plan(pp=2, replicas=[(8, 1)]))
