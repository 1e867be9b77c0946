"""Every parallel layout trains exactly like one process with the same seed and global batch.

The single-process reference uses the *same microbatch partition* as the layout
under test (one replica with the same microbatch size and the total number of
microbatches): the load-balancing loss is computed per microbatch (its f_e * P_e
product is not additive over tokens), so a different partition is a different
objective, not a numerical tolerance question. The uneven-replica case uses
aux-loss-free (bias) balancing, whose objective *is* partition-independent, so its
reference may use any partition.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from plan_factory import make_plan

from conftest import losses

STEPS = 20
SEQ = 16
RTOL = 1e-5


def _assert_close(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=RTOL), f"step {step}"


@pytest.fixture(scope="module")
def reference(forked, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """Single-process losses, microbatches of 2, four per step."""
    out = tmp_path_factory.mktemp("reference")
    plan = make_plan(steps=STEPS, sequence_length=SEQ, replicas=[(2, 4)])
    assert forked(plan, out) == [0]
    result = losses(out)
    assert result[STEPS] < result[1] - 0.05, "the synthetic data must be learnable"
    return result


LAYOUTS = {
    "dp2": {"dp": 2},
    "pp2": {"pp": 2, "replicas": [(2, 4)]},
    "ep2-in-dp2": {"dp": 2, "ep": 2},
    "pp2-dp2-ep2": {"pp": 2, "dp": 2, "ep": 2},
    "uneven-layers-pp2": {"pp": 2, "stage_layers": [1, 5], "replicas": [(2, 4)]},
    # Experts 3 and 4 live on both EP ranks: their slices of the stacked expert
    # weights are summed over both hosts, the other slices over none.
    "ep2-replicated-experts": {
        "dp": 2,
        "ep": 2,
        "rank_experts": [[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]],
    },
}


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_layout_matches_single_process(
    layout: str, reference: dict[int, float], forked, tmp_path: Path
) -> None:
    plan = make_plan(steps=STEPS, sequence_length=SEQ, **LAYOUTS[layout])
    assert forked(plan, tmp_path) == [0] * plan.world_size
    _assert_close(losses(tmp_path), reference)


def test_uneven_replica_batches_match_single_process(forked, tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    plan = make_plan(steps=STEPS, sequence_length=SEQ, replicas=[(4, 2)], balancing="bias")
    assert forked(plan, ref) == [0]
    uneven = make_plan(
        steps=STEPS, sequence_length=SEQ, dp=2, ep=2, replicas=[(3, 2), (1, 2)], balancing="bias"
    )
    assert forked(uneven, tmp_path / "uneven") == [0, 0]
    _assert_close(losses(tmp_path / "uneven"), losses(ref))
