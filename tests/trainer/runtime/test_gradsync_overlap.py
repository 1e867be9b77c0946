"""Gradient all-reduces overlapped with backward train bit-identically to reducing after it."""

from __future__ import annotations

from pathlib import Path

import pytest
from plan_factory import make_plan

from conftest import records
from hetmoe_trainer.gradsync import backward_order

STEPS = 5
BUCKET = 16 << 10
"""Small buckets: many per stage, so most can leave before backward ends."""

LAYOUTS = {
    "dp2": {"dp": 2},
    "pp2-dp2-ep2": {"pp": 2, "dp": 2, "ep": 2},
    # A stacked expert tensor whose slices sit in different lanes (hosts {0, 1} / {0}).
    "dp2-ep2-replicated-experts": {
        "dp": 2,
        "ep": 2,
        "rank_experts": [[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]],
    },
}


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_overlap_is_bit_identical(forked, tmp_path: Path, layout: str) -> None:
    plan = make_plan(steps=STEPS, sequence_length=16, **LAYOUTS[layout])
    runs = {}
    for overlap in (False, True):
        out = tmp_path / str(overlap)
        codes = forked(plan, out, overlap_grad_sync=overlap, grad_bucket_bytes=BUCKET)
        assert codes == [0] * plan.world_size
        runs[overlap] = records(out)
    for plain, overlapped in zip(runs[False], runs[True], strict=True):
        assert overlapped["loss"] == plain["loss"] and overlapped["grad_norm"] == plain["grad_norm"]
        assert plain["overlapped_buckets"] == 0
        assert overlapped["overlapped_buckets"] > 1, "buckets must leave during backward"


def test_buckets_follow_backward_order() -> None:
    names = ["embed.weight", "layers.10.a", "layers.2.a", "norm.weight", "head.weight"]
    assert sorted(names, key=backward_order) == [
        "head.weight",
        "norm.weight",
        "layers.10.a",
        "layers.2.a",
        "embed.weight",
    ]
