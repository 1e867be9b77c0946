"""Fixtures for the model tests: the tiny preset, a training config and stage builders."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from hetmoe_operator.api.model import PRESETS, ModelArchitecture
from hetmoe_operator.api.training import TrainingConfig
from hetmoe_operator.plan import StagePlan
from hetmoe_trainer.model import ExpertParallel, Stage, build_stage

StageFactory = Callable[..., Stage]


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    """Two cores shared with other suites: keep intra-op parallelism modest and stable."""
    torch.set_num_threads(1)


@pytest.fixture
def tiny() -> ModelArchitecture:
    """The tiny preset: GQA, a dense first layer, 8 experts top-2, one shared expert."""
    return PRESETS["tiny"]


@pytest.fixture
def training() -> TrainingConfig:
    """Default stability knobs (aux 0.015, z 1e-4), fixed seed."""
    return TrainingConfig(steps=20, global_batch_size=4, sequence_length=16, seed=7)


def stage_plan(arch: ModelArchitecture, start: int, end: int) -> StagePlan:
    """A stage covering global layers [start, end), with embedding/head at the model ends."""
    return StagePlan(
        index=0,
        layer_start=start,
        layer_end=end,
        has_embedding=start == 0,
        has_head=end == arch.num_hidden_layers,
    )


@pytest.fixture
def make_stage(tiny: ModelArchitecture, training: TrainingConfig) -> StageFactory:
    """Build a tiny-preset stage on CPU: ``make_stage(start, end, experts=None, **overrides)``."""

    def make(
        start: int = 0,
        end: int | None = None,
        experts: Sequence[int] | None = None,
        *,
        arch: ModelArchitecture | None = None,
        config: TrainingConfig | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Stage:
        arch = arch or tiny
        hosted = list(range(arch.num_experts)) if experts is None else list(experts)
        # A subset without a process group builds (for construction and checkpoint
        # tests) but cannot dispatch: the rest is "hosted" by an absent member.
        others = sorted(set(range(arch.num_experts)) - set(hosted))
        ep = ExpertParallel(None, [hosted, others] if others else [hosted], 0)
        plan = stage_plan(arch, start, arch.num_hidden_layers if end is None else end)
        return build_stage(arch, plan, config or training, ep, device="cpu", dtype=dtype)

    return make
