"""``hetmoe run`` argument parsing that needs no processes."""

from __future__ import annotations

import pytest

from hetmoe_operator.cli.run_command import parse_fault
from hetmoe_operator.errors import UserError
from hetmoe_operator.local.supervisor import FaultInjection
from hetmoe_trainer.anomaly import Fault


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
    ("text", "spec"),
    [
        ("kind=slow,rank=1,step=2", "kind=slow,step=2,rank=1,seconds=1"),
        ("seconds=0.5,kind=slow,rank=0,step=0", "kind=slow,step=0,rank=0,seconds=0.5"),
    ],
)
def test_a_slow_fault_carries_its_delay_to_the_trainer(text: str, spec: str) -> None:
    fault = parse_fault(text)
    assert fault.kind == "slow" and fault.trainer_spec() == spec
    assert Fault.parse(fault.trainer_spec()).seconds == fault.seconds


@pytest.mark.parametrize(
    "text",
    [
        "rank=x,step=1",
        "rank=1",
        "kind=nan,rank=1,step=2",
        "rank=1,rank=2,step=3",
        "",
        "kind=crash,rank=1,step=2,seconds=1",
        "kind=slow,rank=1,step=2,seconds=-1",
    ],
)
def test_bad_fault_specs_say_what_is_expected(text: str) -> None:
    with pytest.raises(
        UserError, match=r"expected \[kind=crash\|hang\|slow,\]rank=R,step=S\[,seconds=X\]"
    ):
        parse_fault(text)
