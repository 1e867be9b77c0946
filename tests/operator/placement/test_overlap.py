"""Communication overlap: an explicit, switchable assumption of the cost model."""

from __future__ import annotations

import pytest

from hetmoe_operator.api.job import PlacementSpec
from hetmoe_operator.api.model import PRESETS
from hetmoe_operator.placement import plan_job
from hetmoe_operator.placement.cost_model import Assumptions
from hetmoe_operator.placement.layout import Layout, Problem, evaluate

from .helpers import cluster, grade, training


def _problem(overlap: bool) -> Problem:
    description = cluster([grade("a", 300, 64, 7.0, inter_node_gbps=5.0)], [("pa", "a", 4, 8)])
    return Problem(
        PRESETS["ling-lite"],
        training(256, 4096),
        description,
        [1.0] * 64,
        Assumptions(overlap_communication=overlap),
    )


def test_overlap_hides_communication_but_never_compute() -> None:
    # pp 2, ep 8 across nodes, dp 16: every kind of communication is present.
    layout = Layout(2, 8, (0, 14, 28), (("pa", "pa"),) * 2, 1, (128, 128), (False,) * 2, False)
    exposed = evaluate(_problem(False), layout).step
    hidden = evaluate(_problem(True), layout).step
    assert hidden.communication < exposed.communication
    assert hidden.compute == pytest.approx(exposed.compute, rel=1e-12)
    assert hidden.total < exposed.total
    # Even overlapped, the last gradient bucket and the pipeline's fill transfers stay.
    assert hidden.communication > 0


def test_the_plan_lists_the_overlap_assumption() -> None:
    description = cluster([grade("a", 300, 64, 7.0)], [("pa", "a", 2, 8)])
    plan = plan_job(PRESETS["ling-lite"], training(256, 4096), description, PlacementSpec())
    assert plan.prediction is not None
    text = " ".join(plan.prediction.assumptions)
    assert "overlap (assumed runtime behaviour)" in text
    assert "all-to-all is hidden behind its shared-expert compute" in text
