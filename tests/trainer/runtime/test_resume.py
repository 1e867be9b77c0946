"""Checkpoint and resume: restarts are bit-identical, other plans reshard, saves are atomic."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from plan_factory import make_plan
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import losses, records
from hetmoe_trainer.checkpoint import (
    LATEST,
    MANIFEST,
    Checkpointer,
    newest_valid,
    step_dir,
    verify,
)

SEQ = 16


def _load_dcp(path: Path, tmp: Path) -> dict:
    target = tmp / f"{path.parent.name}-{path.name}.pt"
    dcp_to_torch_save(str(path), str(target))
    return torch.load(target, weights_only=False)


def test_killed_rank_restart_is_bit_identical(forked, tmp_path: Path) -> None:
    plan = make_plan(dp=2, ep=2, steps=12, sequence_length=SEQ)
    assert forked(plan, tmp_path / "clean", checkpoint_interval=4) == [0, 0]
    codes = forked(
        plan,
        tmp_path / "crash",
        checkpoint_interval=4,
        restarts=1,
        faults=["kind=crash,step=9,rank=1,attempt=0"],
    )
    assert codes == [0, 0]
    log = records(tmp_path / "crash")
    assert [r["step"] for r in log].count(9) == 2, "steps after the checkpoint are replayed"
    assert losses(tmp_path / "crash") == losses(tmp_path / "clean")  # bit-identical


@pytest.fixture(scope="module")
def four_rank_run(forked, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 4-rank pp2 x dp2 (ep2) run to step 16, and the same run killed at step 10."""
    root = tmp_path_factory.mktemp("four")
    plan = make_plan(pp=2, dp=2, ep=2, steps=16, sequence_length=SEQ)
    assert forked(plan, root / "clean", checkpoint_interval=8) == [0] * 4
    codes = forked(
        plan,
        root / "killed",
        checkpoint_interval=8,
        async_checkpoint=False,  # step 8 must be complete before the kill at step 10
        faults=["kind=crash,step=10,rank=2"],
    )
    assert any(code != 0 for code in codes)
    return root / "clean", root / "killed"


RESHARD = {
    "4-to-2": {"dp": 2, "ep": 2},
    "4-to-3": {"pp": 3, "stage_layers": [1, 2, 3], "replicas": [(2, 4)]},
}


@pytest.mark.parametrize("layout", list(RESHARD), ids=list(RESHARD))
def test_resume_on_a_different_plan(
    layout: str, four_rank_run: tuple[Path, Path], forked, tmp_path: Path
) -> None:
    clean, killed = four_rank_run
    work = tmp_path / "ckpt"
    shutil.copytree(killed, work)
    plan = make_plan(steps=16, sequence_length=SEQ, **RESHARD[layout])

    # Model and optimizer state survive resharding bit for bit.
    resaved = tmp_path / "resaved"
    assert forked(plan, work, resave=str(resaved)) == [0] * plan.world_size
    original = _load_dcp(step_dir(work, 8), tmp_path)
    again = _load_dcp(step_dir(resaved, 8), tmp_path)
    tensors = [k for k in original if k.startswith(("model.", "optim."))]
    assert tensors and sorted(tensors) == sorted(
        k for k in again if k.startswith(("model.", "optim."))
    )
    for key in tensors:
        assert torch.equal(original[key], again[key]), key

    # Training continues at the same consumed sample and follows the 4-rank run.
    assert forked(plan, work, checkpoint_interval=8) == [0] * plan.world_size
    resumed = [r for r in records(work) if r["step"] > 8]
    batch = plan.training.global_batch_size
    assert resumed[-8]["step"] == 9 and resumed[-8]["consumed_samples"] == 9 * batch
    want, got = losses(clean), losses(work)
    for step in range(9, 17):
        assert got[step] == pytest.approx(want[step], rel=1e-5), step


def test_kill_during_async_save_keeps_latest_complete(forked, tmp_path: Path) -> None:
    plan = make_plan(dp=2, steps=12, sequence_length=SEQ)
    codes = forked(
        plan, tmp_path, checkpoint_interval=4, faults=["kind=crash,step=8,rank=0,when=save"]
    )
    assert codes[0] != 0
    assert (tmp_path / LATEST).read_text().strip() == step_dir(tmp_path, 4).name
    assert verify(step_dir(tmp_path, 4)) is None
    assert not (step_dir(tmp_path, 8) / MANIFEST).exists()
    assert newest_valid(tmp_path) == step_dir(tmp_path, 4)
    assert forked(plan, tmp_path, checkpoint_interval=4) == [0, 0]
    assert (tmp_path / LATEST).read_text().strip() == step_dir(tmp_path, 12).name


def test_corrupted_checkpoint_is_skipped_for_the_previous(
    forked, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plan = make_plan(steps=8, sequence_length=SEQ, replicas=[(2, 2)])
    assert forked(plan, tmp_path, checkpoint_interval=4) == [0]
    newest = step_dir(tmp_path, 8)
    data = next(f for f in newest.iterdir() if f.suffix == ".distcp")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        assert newest_valid(tmp_path) == step_dir(tmp_path, 4)
    assert "step_00000008 failed its integrity check" in caplog.text
    assert "CRC32" in caplog.text


def test_reused_staging_buffers_hold_each_saves_own_values(
    single_process_group, tmp_path: Path
) -> None:
    """Every async save refills the checkpointer's staging buffers: no stale or later data."""
    weight = torch.zeros(256, 64)
    checkpointer = Checkpointer(tmp_path, None, keep=3, use_async=True)
    for step in (1, 2, 3):
        weight.fill_(float(step))
        checkpointer.save(step, {"model.w": weight, "trainer": f"step {step}"})
        checkpointer.wait_staged()
        weight.fill_(-1.0)  # the next optimizer step: must not reach this checkpoint
    checkpointer.close()
    for step in (1, 2, 3):
        loaded = {"model.w": torch.empty(256, 64), "trainer": ""}
        checkpointer.load(step_dir(tmp_path, step), loaded)
        assert torch.equal(loaded["model.w"], torch.full((256, 64), float(step)))
        assert loaded["trainer"] == f"step {step}"
    assert (tmp_path / LATEST).read_text().strip() == step_dir(tmp_path, 3).name
