"""Injected anomalies get the documented reaction, and skipped steps leave the optimizer alone."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from plan_factory import make_plan
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import records
from hetmoe_operator.api.training import AnomalyPolicy
from hetmoe_operator.plan import TERMINATION_LOG_ENV, WorkerExit, parse_replace_node_request
from hetmoe_trainer.anomaly import Fault
from hetmoe_trainer.checkpoint import step_dir
from hetmoe_trainer.distributed import build_context, pick_device
from hetmoe_trainer.loop import Trainer, TrainerOptions

SEQ = 16
POLICY = AnomalyPolicy(window=8, spike_zscore=6.0, max_consecutive_skips=3)


def _trainer(tmp_path: Path, faults: list[str], steps: int = 20, **options: object) -> Trainer:
    plan = make_plan(steps=steps, sequence_length=SEQ, replicas=[(2, 2)], anomaly=POLICY)
    return Trainer(
        build_context(plan, 0, pick_device(0)),
        TrainerOptions(
            checkpoint_dir=tmp_path,
            faults=tuple(Fault.parse(f) for f in faults),
            peak_flops=1e11,
            **options,
        ),
    )


def _optimizer_snapshot(trainer: Trainer) -> list[dict[str, torch.Tensor]]:
    return [copy.deepcopy(s) for s in trainer.optimizer.state.values()]


def _params(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.stage.parameters()]


def _same(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if isinstance(x, dict):
            if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
                return False
        elif not torch.equal(x, y):
            return False
    return True


@pytest.mark.usefixtures("single_process_group")
def test_spike_is_skipped_set_aside_and_reinjected(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, ["kind=spike,step=12,scale=50"])
    for _ in range(12):
        trainer.train_step()
    optimizer, params = _optimizer_snapshot(trainer), _params(trainer)
    trainer.train_step()
    assert trainer.history[-1]["action"] == "skip"
    assert _same(_optimizer_snapshot(trainer), optimizer) and _same(_params(trainer), params)
    assert len(trainer.detector.set_aside) == 1
    due, _ = trainer.detector.set_aside[0]
    assert 12 < due <= 12 + 2 + POLICY.window // 4
    while trainer.step < 20:
        trainer.train_step()
    assert trainer.detector.counts == {"spike": 1, "skipped": 1, "reinjected": 1}
    assert [h["action"] for h in trainer.history].count("apply") == 19
    assert all(s["step"].item() == 19 for s in trainer.optimizer.state.values())


@pytest.mark.usefixtures("single_process_group")
def test_persistent_spike_lowers_the_learning_rate(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, ["kind=spike,step=12,scale=50,sticky=1"])
    assert trainer.run() == WorkerExit.OK
    actions = [h["action"] for h in trainer.history]
    assert actions.count("skip") == 1 and actions.count("lower_lr") == 1
    lowered = next(h for h in trainer.history if h["action"] == "lower_lr")
    assert trainer.detector.counts["lowered_lr"] == 1 and trainer.detector.counts["reinjected"] == 1
    assert lowered["lr"] < 0.2 * trainer.training.lr.peak


def test_nan_on_one_rank_is_skipped_by_all(forked, tmp_path: Path) -> None:
    plan = make_plan(dp=2, steps=10, sequence_length=SEQ, anomaly=POLICY)
    assert forked(plan, tmp_path, faults=["kind=nan,step=5,rank=1"]) == [0, 0]
    log = records(tmp_path)
    assert [r["action"] for r in log] == ["apply"] * 5 + ["skip"] + ["apply"] * 4
    assert log[5]["loss"] == log[5]["loss"]  # the loss itself was finite; the gradient was not
    state = tmp_path / "final.pt"
    dcp_to_torch_save(str(step_dir(tmp_path, 10)), str(state))
    steps = {k: v for k, v in torch.load(state, weights_only=False).items() if k.endswith(".step")}
    assert steps and all(v.item() == 9 for v in steps.values()), (
        "the skipped step never reached AdamW"
    )
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["anomalies"]["nonfinite"] == 1 and progress["anomalies"]["skipped"] == 1


@pytest.mark.usefixtures("single_process_group")
def test_repeated_anomalies_roll_back_and_skip_the_sample_range(tmp_path: Path) -> None:
    faults = [f"kind=nan,step={s}" for s in (9, 10, 11)]
    trainer = _trainer(tmp_path, faults, steps=14, checkpoint_interval=4, async_checkpoint=False)
    assert trainer.run() == WorkerExit.OK
    batch = trainer.training.global_batch_size
    assert trainer.stream.skip_ranges == [(9 * batch, 12 * batch)]
    assert trainer.detector.counts["rollback"] == 1
    event = next(e for e in trainer.detector.events if e["kind"] == "rollback")
    assert "checkpoint step 8" in event["detail"]
    replayed = [h for h in trainer.history if h["step"] == 10]
    assert replayed[-1]["consumed_samples"] == 13 * batch, "the stream jumps over the bad range"


def test_persistent_straggler_saves_and_every_rank_names_its_node(
    forked, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = AnomalyPolicy(window=8, straggler_factor=1.5, straggler_patience=3)
    plan = make_plan(dp=2, steps=30, sequence_length=SEQ, anomaly=policy)
    first, second = plan.ranks  # on two nodes, so naming the right one matters
    plan = plan.model_copy(
        update={"ranks": [first, second.model_copy(update={"node_slot": 1, "local_rank": 0})]}
    )
    reasons = tmp_path / "termination-log"
    monkeypatch.setenv(TERMINATION_LOG_ENV, str(reasons))
    codes = forked(plan, tmp_path / "ckpt", faults=["kind=slow,rank=1,seconds=1.5"])
    assert codes == [WorkerExit.REPLACE_NODE] * 2
    progress = json.loads((tmp_path / "ckpt" / "progress.json").read_text())
    assert progress["state"] == "straggler"
    assert progress["straggler"]["plan_rank"] == 1 and progress["straggler"]["score"] > 1.5
    assert progress["step"] <= 2 + 3 + 1
    # No step is lost to the replacement: the exit step is the latest checkpoint.
    assert progress["last_checkpoint_step"] == progress["step"]
    latest = (tmp_path / "ckpt" / "latest").read_text().strip()
    assert latest == step_dir(tmp_path / "ckpt", progress["step"]).name
    # Whichever worker the operator sees first names the straggler's node.
    lines = reasons.read_text().splitlines()
    assert len(lines) == 2
    assert {parse_replace_node_request(line) for line in lines} == {("local", 1)}


def test_fault_specs_are_parsed_strictly() -> None:
    assert Fault.parse("kind=nan,step=5,rank=1") == Fault(kind="nan", step=5, rank=1)
    for bad in ("kind=boom", "kind=nan,stp=5", "kind=slow,seconds=x", "nan"):
        with pytest.raises(ValueError):
            Fault.parse(bad)
