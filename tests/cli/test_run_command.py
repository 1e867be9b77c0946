"""``hetmoe run`` argument parsing that needs no processes."""

from __future__ import annotations

import pytest

from hetmoe_operator.cli.run_command import parse_fault
from hetmoe_operator.errors import UserError
from hetmoe_operator.local.supervisor import FaultInjection


@pytest.mark.parametrize(
    ("text", "fault"),
    [
        ("rank=1,step=12", FaultInjection(rank=1, step=12)),
        ("step=3,rank=0", FaultInjection(rank=0, step=3)),
        ("kind=hang,rank=1,step=3", FaultInjection(rank=1, step=3, kind="hang")),
        ("rank=1,kind=crash,step=3", FaultInjection(rank=1, step=3)),
    ],
)
def test_fault_specs_parse(text: str, fault: FaultInjection) -> None:
    assert parse_fault(text) == fault
    assert (
        parse_fault(text).trainer_spec() == f"kind={fault.kind},step={fault.step},rank={fault.rank}"
    )


@pytest.mark.parametrize(
    "text", ["rank=x,step=1", "rank=1", "kind=nan,rank=1,step=2", "rank=1,rank=2,step=3", ""]
)
def test_bad_fault_specs_say_what_is_expected(text: str) -> None:
    with pytest.raises(UserError, match=r"expected \[kind=crash\|hang,\]rank=R,step=S"):
        parse_fault(text)
