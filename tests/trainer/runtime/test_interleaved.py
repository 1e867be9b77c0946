"""Interleaved 1F1B (``virtual_stages`` > 1) trains like one process and keeps global names.

pp = 2 with two virtual stages per rank: rank 0 holds chunks 0 and 2, rank 1 chunks 1
and 3 of the tiny model's six layers. The single-process reference uses the same
microbatch partition (see test_correctness.py for why that matters).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from plan_factory import make_plan
from pydantic import ValidationError
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import losses
from hetmoe_operator.plan import Plan
from hetmoe_trainer.checkpoint import step_dir
from hetmoe_trainer.distributed import PlanError, validate_plan
from hetmoe_trainer.model import ExpertParallel, build_stage

STEPS = 20
SEQ = 16
RTOL = 1e-5
REPLICAS = [(2, 4)]


def _load_dcp(path: Path, tmp: Path) -> dict:
    target = tmp / f"{path.parent.name}-{path.name}.pt"
    dcp_to_torch_save(str(path), str(target))
    return torch.load(target, weights_only=False)


def test_chunked_stages_compose_to_the_whole_model() -> None:
    """Chunks run in virtual-stage order give the unsplit model's logits, bit for bit."""
    torch.manual_seed(0)
    plan = make_plan(pp=2, virtual_stages=2, replicas=REPLICAS, sequence_length=SEQ)
    whole_plan = make_plan(replicas=REPLICAS, sequence_length=SEQ)
    ep = ExpertParallel(None, [list(range(plan.model.num_experts))], 0)
    args = (plan.model,)
    positions = [
        build_stage(*args, plan.stages_at(r), plan.training, ep, device="cpu") for r in range(2)
    ]
    whole = build_stage(*args, whole_plan.stages[0], whole_plan.training, ep, device="cpu")
    assert sorted(positions[0].layers) == ["0", "1", "4"] and sorted(positions[1].layers) == [
        "2",
        "3",
        "5",
    ]
    names = {n for stage in positions for n, _ in stage.named_parameters()}
    assert names == {n for n, _ in whole.named_parameters()}
    tokens = torch.randint(0, plan.model.vocab_size, (2, SEQ))
    with torch.no_grad():
        x = tokens
        for virtual in range(4):
            x = positions[virtual % 2](x, step=5, chunk=virtual // 2)
        assert torch.equal(x, whole(tokens, step=5))


def test_plan_validation() -> None:
    plan = make_plan(pp=2, virtual_stages=2, replicas=REPLICAS)
    wire = json.loads(plan.to_json())
    wire["virtualStages"] = 3
    with pytest.raises(ValidationError, match="pp x virtual_stages = 6"):
        Plan.model_validate(wire)
    old = json.loads(make_plan(pp=2, replicas=REPLICAS).to_json())
    del old["virtualStages"]  # a plan written before the field existed
    assert Plan.model_validate(old).virtual_stages == 1
    validate_plan(plan)
    with pytest.raises(PlanError, match="multiple of pp 2, got 3"):
        validate_plan(make_plan(pp=2, virtual_stages=2, replicas=[(2, 3)]))


@pytest.fixture(scope="module")
def runs(forked, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A single-process reference run and an interleaved pp=2 run, both checkpointing."""
    root = tmp_path_factory.mktemp("interleaved")
    single = make_plan(steps=STEPS, sequence_length=SEQ, replicas=REPLICAS)
    assert forked(single, root / "single", checkpoint_interval=10) == [0]
    plan = make_plan(pp=2, virtual_stages=2, steps=STEPS, sequence_length=SEQ, replicas=REPLICAS)
    assert forked(plan, root / "interleaved", checkpoint_interval=10) == [0, 0]
    return root / "single", root / "interleaved"


def test_interleaved_matches_single_process(runs: tuple[Path, Path]) -> None:
    single, interleaved = runs
    want, got = losses(single), losses(interleaved)
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(want)
    assert want[STEPS] < want[1] - 0.05, "the synthetic data must be learnable"
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=RTOL), f"step {step}"


@pytest.mark.parametrize("layout", [{"pp": 2}, {}], ids=["plain-pp2", "single-process"])
def test_interleaved_checkpoint_reshards(
    layout: dict, runs: tuple[Path, Path], forked, tmp_path: Path
) -> None:
    """Saved by the interleaved layout, loaded by a non-interleaved one: the same state."""
    single, interleaved = runs
    plan = make_plan(steps=STEPS, sequence_length=SEQ, replicas=REPLICAS, **layout)
    resaved = tmp_path / "resaved"
    assert forked(plan, interleaved, resave=str(resaved)) == [0] * plan.world_size
    original = _load_dcp(step_dir(interleaved, STEPS), tmp_path)
    again = _load_dcp(step_dir(resaved, STEPS), tmp_path)
    reference = _load_dcp(step_dir(single, STEPS), tmp_path)

    def tensors(state: dict) -> list[str]:
        return sorted(k for k in state if k.startswith(("model.", "optim.")))

    assert tensors(original) and tensors(original) == tensors(again) == tensors(reference)
    assert "model.layers.4.attention.dense.weight" in original
    for key in tensors(original):
        assert torch.equal(original[key], again[key]), key
    # Same training as the single-process run: the same weights up to fp32 rounding,
    # which AdamW can amplify to a small fraction of one update (lr 3e-3) where a
    # gradient is near zero; a misplaced layer would differ by the init scale (2e-2).
    for key in (k for k in tensors(original) if k.startswith("model.")):
        torch.testing.assert_close(original[key], reference[key], rtol=1e-3, atol=1e-4)
