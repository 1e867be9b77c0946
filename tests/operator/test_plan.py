"""The plan module's exit-code contract helpers, shared by the trainer and the operator."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hetmoe_operator.plan import parse_replace_node_request, replace_node_request

POOL_NAMES = st.from_regex(r"\A[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?\Z")


@given(
    pool=POOL_NAMES,
    slot=st.integers(min_value=0, max_value=100_000),
    before=st.text(max_size=40),
    after=st.text(max_size=40),
)
def test_a_replace_node_mark_is_found_inside_any_reason(
    pool: str, slot: int, before: str, after: str
) -> None:
    message = f"{before}{replace_node_request(pool, slot)}{after}"
    assert parse_replace_node_request(message) == (pool, slot)


def test_a_reason_without_the_mark_names_no_node() -> None:
    assert parse_replace_node_request("rank 1 straggled: replace its node") is None
    assert parse_replace_node_request("") is None
