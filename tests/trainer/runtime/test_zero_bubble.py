"""Zero-bubble V (``pipeline_shape="v"``) trains like one process and keeps global names.

pp = 2 with the v shape: position 0 holds stages 0 and 3 (embedding, layers 0-1, and
layer 5 with the LM head), position 1 stages 1 and 2 (layers 2-4). Position 0 reads
the inputs *and* the targets and reports the loss. The single-process reference uses
the same microbatch partition (see test_correctness.py for why that matters).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from plan_factory import make_plan
from pydantic import ValidationError
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import losses, records
from hetmoe_operator.plan import Plan
from hetmoe_trainer.checkpoint import step_dir
from hetmoe_trainer.distributed import PlanError, validate_plan
from hetmoe_trainer.loop import Trainer, TrainerOptions
from hetmoe_trainer.model import ExpertParallel, build_stage

STEPS = 20
SEQ = 16
RTOL = 1e-5
REPLICAS = [(2, 4)]
V = {"pp": 2, "virtual_stages": 2, "pipeline_shape": "v"}


def _load_dcp(path: Path, tmp: Path) -> dict:
    target = tmp / f"{path.parent.name}-{path.name}.pt"
    dcp_to_torch_save(str(path), str(target))
    return torch.load(target, weights_only=False)


def _assert_matches(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=RTOL), f"step {step}"


def test_v_chunks_compose_to_the_whole_model() -> None:
    """Stages run in V order (0, 1 on position 0, 1; 2, 3 back) give the unsplit logits."""
    torch.manual_seed(0)
    plan = make_plan(**V, replicas=REPLICAS, sequence_length=SEQ)
    whole_plan = make_plan(replicas=REPLICAS, sequence_length=SEQ)
    ep = ExpertParallel(None, [list(range(plan.model.num_experts))], 0)
    positions = [
        build_stage(plan.model, plan.stages_at(r), plan.training, ep, device="cpu")
        for r in range(2)
    ]
    whole = build_stage(plan.model, whole_plan.stages[0], whole_plan.training, ep, device="cpu")
    assert [s.index for s in plan.stages_at(0)] == [0, 3]
    assert sorted(positions[0].layers) == ["0", "1", "5"]
    assert sorted(positions[1].layers) == ["2", "3", "4"]
    assert positions[0].has_embedding and positions[0].has_head
    assert not positions[1].has_embedding and not positions[1].has_head
    names = {n for stage in positions for n, _ in stage.named_parameters()}
    assert names == {n for n, _ in whole.named_parameters()}
    tokens = torch.randint(0, plan.model.vocab_size, (2, SEQ))
    with torch.no_grad():
        x = tokens
        for stage in range(4):
            position = plan.position_of(stage)
            chunk = [s.index for s in plan.stages_at(position)].index(stage)
            x = positions[position](x, step=5, chunk=chunk)
        assert torch.equal(x, whole(tokens, step=5))


def test_v_plan_validation() -> None:
    plan = make_plan(**V, replicas=REPLICAS)
    validate_plan(plan)
    wire = json.loads(make_plan(pp=2, virtual_stages=3, replicas=[(2, 6)]).to_json())
    wire["pipelineShape"] = "v"
    with pytest.raises(ValidationError, match="v pipeline shape holds 2 stages per position"):
        Plan.model_validate(wire)
    old = json.loads(make_plan(pp=2, virtual_stages=2, replicas=REPLICAS).to_json())
    del old["pipelineShape"]  # a plan written before the field existed
    assert Plan.model_validate(old).pipeline_shape == "loop"
    with pytest.raises(PlanError, match="zero-bubble V needs at least one microbatch per stage"):
        validate_plan(make_plan(**V, replicas=[(2, 1)]))
    # Unlike interleaved 1F1B, ZB-V takes a microbatch count that is not a multiple of pp.
    validate_plan(make_plan(**V, replicas=[(2, 3)]))
    with pytest.raises(PlanError, match="multiple of pp 2, got 3"):
        validate_plan(make_plan(pp=2, virtual_stages=2, replicas=[(2, 3)]))


def test_compile_is_rejected_under_v(tmp_path: Path) -> None:
    """Checked before anything is built, so no process group is needed."""
    plan = make_plan(**V, replicas=REPLICAS)
    context = SimpleNamespace(plan=plan, me=plan.ranks[0])
    options = TrainerOptions(checkpoint_dir=tmp_path, compile=True)
    with pytest.raises(PlanError, match="drop --compile"):
        Trainer(context, options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def runs(forked, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A single-process reference run and a v-shaped pp=2 run, both checkpointing."""
    root = tmp_path_factory.mktemp("zero-bubble")
    single = make_plan(steps=STEPS, sequence_length=SEQ, replicas=REPLICAS)
    assert forked(single, root / "single", checkpoint_interval=10) == [0]
    plan = make_plan(**V, steps=STEPS, sequence_length=SEQ, replicas=REPLICAS)
    assert forked(plan, root / "v", checkpoint_interval=10) == [0, 0]
    return root / "single", root / "v"


def test_v_matches_single_process(runs: tuple[Path, Path]) -> None:
    single, v = runs
    want = losses(single)
    assert want[STEPS] < want[1] - 0.05, "the synthetic data must be learnable"
    _assert_matches(losses(v), want)


def test_v_microbatch_count_not_a_multiple_of_pp(forked, tmp_path: Path) -> None:
    """3 microbatches at pp 2: interleaved 1F1B refuses it, ZB-V runs it (it plans
    max(2 pp - 1, n) slots and drops the missing ones) and still trains like one process."""
    kw = {"steps": 5, "sequence_length": SEQ, "replicas": [(2, 3)]}
    assert forked(make_plan(**kw), tmp_path / "single") == [0]
    assert forked(make_plan(**V, **kw), tmp_path / "v") == [0, 0]
    want, got = losses(tmp_path / "single"), losses(tmp_path / "v")
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=RTOL), f"step {step}"


def test_v_with_empty_stages(forked, tmp_path: Path) -> None:
    """Stages without layers (allowed by the plan) still compose: an embedding-only
    stage 0, and a middle stage that passes activations through (an identity chunk)."""
    kw = {"steps": 4, "sequence_length": SEQ, "replicas": REPLICAS}
    assert forked(make_plan(**kw), tmp_path / "single") == [0]
    want = losses(tmp_path / "single")
    for layers in ([0, 2, 2, 2], [2, 0, 2, 2]):
        out = tmp_path / "-".join(map(str, layers))
        assert forked(make_plan(**V, stage_layers=layers, **kw), out) == [0, 0]
        got = losses(out)
        assert sorted(got) == sorted(want) == [1, 2, 3, 4]
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=RTOL), f"{layers} step {step}"


def test_v_with_expert_and_data_parallel(runs: tuple[Path, Path], forked, tmp_path: Path) -> None:
    """pp 2 x dp 2 (one EP group of 2 per position, experts 3 and 4 on both EP ranks,
    ZeRO-1), two microbatches per replica (fewer than the 2 pp - 1 ZB-V plans for), with
    activation recompute (each checkpointed layer, all-to-alls included, re-runs in I and
    again in W) and overlapped gradient sync (its post-accumulate hooks only fire for
    stage 0, whose W is a full backward; the rest is reduced after the schedule). The
    same microbatch partition as the reference, so the same losses."""
    plan = make_plan(
        **V,
        dp=2,
        ep=2,
        rank_experts=[[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]],
        recompute=True,
        steps=STEPS,
        sequence_length=SEQ,
    )
    assert forked(plan, tmp_path, overlap_grad_sync=True) == [0] * 4
    _assert_matches(losses(tmp_path), losses(runs[0]))
    assert all(r["action"] == "apply" for r in records(tmp_path))


@pytest.mark.parametrize(
    "layout",
    [{"pp": 2, "virtual_stages": 2}, {"pp": 2}, {}],
    ids=["interleaved-pp2", "plain-pp2", "single-process"],
)
def test_v_checkpoint_reshards(
    layout: dict, runs: tuple[Path, Path], forked, tmp_path: Path
) -> None:
    """Saved by the v layout, loaded by a loop-shaped one: the same state, global names."""
    single, v = runs
    plan = make_plan(steps=STEPS, sequence_length=SEQ, replicas=REPLICAS, **layout)
    resaved = tmp_path / "resaved"
    assert forked(plan, v, resave=str(resaved)) == [0] * plan.world_size
    original = _load_dcp(step_dir(v, STEPS), tmp_path)
    again = _load_dcp(step_dir(resaved, STEPS), tmp_path)
    reference = _load_dcp(step_dir(single, STEPS), tmp_path)

    def tensors(state: dict) -> list[str]:
        return sorted(k for k in state if k.startswith(("model.", "optim.")))

    assert tensors(original) and tensors(original) == tensors(again) == tensors(reference)
    assert "model.layers.5.attention.dense.weight" in original and "model.head.weight" in original
    for key in tensors(original):
        assert torch.equal(original[key], again[key]), key
    # Same training as the single-process run: the same weights up to fp32 rounding
    # (see test_interleaved.py); a misplaced layer would differ by the init scale.
    for key in (k for k in tensors(original) if k.startswith("model.")):
        torch.testing.assert_close(original[key], reference[key], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("virtual", [1, 2])
def test_split_backward_loop_matches_single_process(
    runs: tuple[Path, Path], forked, tmp_path: Path, virtual: int
) -> None:
    """ZB-H1 (one stage per position) and ZB1P (two chunks) under torch's
    ScheduleInterleavedZeroBubble train like one process."""
    plan = make_plan(
        pp=2,
        virtual_stages=virtual,
        split_backward=True,
        steps=STEPS,
        sequence_length=SEQ,
        replicas=REPLICAS,
    )
    assert plan.schedule_name == ("ZB-H1" if virtual == 1 else "ZB1P")
    assert forked(plan, tmp_path / "zb") == [0, 0]
    _assert_matches(losses(tmp_path / "zb"), losses(runs[0]))


def test_split_backward_loop_needs_whole_rounds() -> None:
    validate_plan(make_plan(pp=2, split_backward=True, replicas=[(2, 3)]))  # one round of 3
    with pytest.raises(PlanError, match="equal rounds"):
        validate_plan(make_plan(pp=2, split_backward=True, replicas=[(2, 5)]))  # 2 rounds
