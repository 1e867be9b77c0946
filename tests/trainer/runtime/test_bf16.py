"""bf16 compute (what CUDA runs by default) through every kind of parallelism, on CPU.

No GPU here, so the CUDA path's dtype handling is exercised on CPU instead: the same
autocast, bf16 activations between pipeline stages, bf16 tokens through the expert
all-to-all and fp32 parameters, optimizer state and loss, with pp = dp = ep = 2 under
torchrun. The loss must follow the fp32 run closely but not exactly: identical losses
would mean bf16 was never used.
"""

from __future__ import annotations

from pathlib import Path

from plan_factory import make_plan

from conftest import losses, run_torchrun

STEPS = 10
RTOL = 1e-2


def test_bf16_compute_trains_like_fp32_with_pipeline_data_and_expert_parallelism(
    tmp_path: Path,
) -> None:
    plan = make_plan(pp=2, dp=2, ep=2, steps=STEPS, sequence_length=16)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        result = run_torchrun(plan, tmp_path / dtype, "--dtype", dtype)
        assert result.returncode == 0, result.stderr[-4000:]
        runs[dtype] = losses(tmp_path / dtype / "ckpt")
    fp32, bf16 = runs["float32"], runs["bfloat16"]
    assert sorted(bf16) == sorted(fp32) == list(range(1, STEPS + 1))
    for step in fp32:
        assert abs(bf16[step] - fp32[step]) <= RTOL * abs(fp32[step]), (step, bf16, fp32)
    assert bf16 != fp32, "bf16 losses equal fp32 to the bit: autocast did not take effect"
    assert bf16[STEPS] < bf16[1]
