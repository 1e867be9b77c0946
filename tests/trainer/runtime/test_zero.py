"""ZeRO-1: each rank holds AdamW state only for its share, and training is unchanged.

The layout (dp 2, ep 2, experts 3 and 4 hosted by both EP ranks) has all three kinds
of unit: dense parameters shared by both replicas, experts held by one rank, and
replicated experts whose slices of the stacked weights are owned by one of their two
hosts (optimized through alias parameters).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from plan_factory import make_plan

from conftest import free_port, losses
from hetmoe_operator.plan import Plan
from hetmoe_trainer.checkpoint import step_dir

STEPS = 6
SEQ = 16
LAYOUT = {"dp": 2, "ep": 2, "rank_experts": [[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]]}
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def _worker(plan_json: str, rank: int, port: int, out: str, zero: bool) -> None:
    from hetmoe_trainer.distributed import build_context, pick_device
    from hetmoe_trainer.loop import Trainer, TrainerOptions

    code = 1
    try:
        torch.set_num_threads(1)
        plan = Plan.from_json(plan_json)
        store = dist.TCPStore("127.0.0.1", port, plan.world_size, rank == 0)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=plan.world_size)
        trainer = Trainer(
            build_context(plan, rank, pick_device(0)),
            TrainerOptions(checkpoint_dir=Path(out), peak_flops=1e11, zero=zero),
        )
        code = trainer.run()
        moments = {
            key[len("optim.") : -len(".exp_avg")]: value.numel()
            for key, value in trainer.state().items()
            if key.startswith("optim.") and key.endswith(".exp_avg")
        }
        state_bytes = sum(
            value.numel() * value.element_size()
            for slots in trainer.optimizer.state.values()
            for value in slots.values()
        )
        report = {"moments": moments, "bytes": state_bytes, "numel": trainer.shards.numel()}
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _run(plan: Plan, out: Path, zero: bool) -> list[dict]:
    context = multiprocessing.get_context("fork")
    port = free_port()
    procs = [
        context.Process(target=_worker, args=(plan.to_json(), rank, port, str(out), zero))
        for rank in range(plan.world_size)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)
        if proc.is_alive():
            proc.kill()
    assert [p.exitcode for p in procs] == [0] * plan.world_size
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(plan.world_size)]


def _expert(key: str) -> int | None:
    match = _EXPERT.search(key)
    return int(match.group(1)) if match else None


@pytest.fixture(scope="module")
def runs(forked, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One process (reference), then dp 2 with full state and with ZeRO-1."""
    ref = tmp_path_factory.mktemp("single")
    single = make_plan(steps=STEPS, sequence_length=SEQ, replicas=[(2, 4)])
    assert forked(single, ref) == [0]
    plan = make_plan(steps=STEPS, sequence_length=SEQ, **LAYOUT)
    full, zero = tmp_path_factory.mktemp("full"), tmp_path_factory.mktemp("zero")
    return {
        "reference": losses(ref),
        "full": _run(plan, full, zero=False),
        "zero": _run(plan, zero, zero=True),
        "losses": losses(zero),
    }


def test_dense_state_is_split_between_the_replicas(runs: dict) -> None:
    full, zero = runs["full"], runs["zero"]
    dense = {k: n for k, n in full[0]["moments"].items() if _expert(k) is None}
    assert dense and all(_expert(k) is None for k in dense)
    mine = [{k for k in r["moments"] if _expert(k) is None} for r in zero]
    # Every dense moment is held exactly once, and each replica holds about half.
    assert mine[0].isdisjoint(mine[1]) and mine[0] | mine[1] == set(dense)
    total = sum(dense.values())
    for keys in mine:
        assert 0.35 < sum(dense[k] for k in keys) / total < 0.65


def test_expert_state_is_split_among_each_experts_hosts(runs: dict) -> None:
    full, zero = runs["full"], runs["zero"]
    for rank, hosted in enumerate(LAYOUT["rank_experts"]):
        assert {_expert(k) for k in full[rank]["moments"]} - {None} == set(hosted)
    held = [{k for k in r["moments"] if _expert(k) is not None} for r in zero]
    # Experts hosted once keep all their state on their host ...
    for rank, only in ((0, {0, 1, 2}), (1, {5, 6, 7})):
        want = {k for k in full[rank]["moments"] if _expert(k) in only}
        assert want <= held[rank] and not want & held[1 - rank]
    # ... the two hosts of experts 3 and 4 split it, each slice held exactly once.
    shared = {k for k in full[0]["moments"] if _expert(k) in (3, 4)}
    split = [keys & shared for keys in held]
    assert split[0] and split[1] and split[0].isdisjoint(split[1])
    assert split[0] | split[1] == shared


def test_zero_shrinks_optimizer_state_and_trains_alike(runs: dict) -> None:
    full, zero = runs["full"], runs["zero"]
    for before, after in zip(full, zero, strict=True):
        assert after["bytes"] < 0.75 * before["bytes"]
        assert after["numel"] < 0.75 * before["numel"]
    got, want = runs["losses"], runs["reference"]
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), f"step {step}"


def test_checkpoint_with_full_state_resumes_under_zero(forked, tmp_path: Path) -> None:
    """A checkpoint written without ZeRO (full moments on every rank) loads each rank's share."""
    plan = make_plan(steps=STEPS, sequence_length=SEQ, **LAYOUT)
    full = tmp_path / "full"
    assert forked(plan, full, zero=False, checkpoint_interval=3) == [0, 0]
    resumed = tmp_path / "resumed"
    shutil.copytree(step_dir(full, 3), step_dir(resumed, 3))
    assert forked(plan, resumed) == [0, 0]
    got, want = losses(resumed), losses(full)
    assert sorted(got) == list(range(4, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-6), f"step {step}"
