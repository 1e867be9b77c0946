"""Per-device memory of a stage."""

from __future__ import annotations

import pytest

from hetmoe_operator.api.model import PRESETS
from hetmoe_operator.placement.cost_model import GIB, Assumptions
from hetmoe_operator.placement.memory import (
    MemoryModel,
    StageShape,
    interleaved_peaks,
    split_chunk,
)

from .helpers import grade


def shape(start: int, end: int, **overrides: object) -> StageShape:
    values: dict = dict(
        start=start,
        end=end,
        has_embedding=start == 0,
        has_head=False,
        expert_slots=8,
        dense_shards=4,
        expert_shards=1,
        in_flight=2,
        recompute=False,
    )
    values.update(overrides)
    return StageShape(**values)


def test_parameters_are_counted_with_documented_bytes() -> None:
    model = PRESETS["tiny"]
    memory = MemoryModel(model, 128, Assumptions())
    usage = memory.stage(shape(1, 2, has_embedding=False, dense_shards=1), microbatch_size=1)
    params = model.layer_params(1)  # all 8 experts hosted
    assert usage.weights == 2 * params
    assert usage.gradients == 4 * params
    assert usage.optimizer == 12 * params
    assert usage.overhead == 1.5 * GIB


def test_optimizer_state_is_sharded_over_data_parallelism() -> None:
    memory = MemoryModel(PRESETS["tiny"], 128, Assumptions())
    one = memory.stage(shape(1, 3, dense_shards=1, expert_shards=1), 1).optimizer
    four = memory.stage(shape(1, 3, dense_shards=4, expert_shards=4), 1).optimizer
    assert four == pytest.approx(one / 4)


def test_recompute_and_fewer_microbatches_in_flight_save_activations() -> None:
    memory = MemoryModel(PRESETS["ling-lite"], 4096, Assumptions())
    full = memory.stage(shape(0, 8, in_flight=4), 1).activations
    fewer = memory.stage(shape(0, 8, in_flight=2), 1).activations
    recomputed = memory.stage(shape(0, 8, in_flight=4, recompute=True), 1).activations
    assert fewer < full and recomputed < full / 3
    assert memory.stage(shape(0, 8, in_flight=4), 2).activations == pytest.approx(2 * full)


def test_fast_total_matches_the_breakdown() -> None:
    memory = MemoryModel(PRESETS["ling-plus"], 4096, Assumptions())
    for recompute in (False, True):
        for has_head in (False, True):
            template = shape(0, 0, has_head=has_head, recompute=recompute, expert_shards=2)
            total = memory.stage_total_fn(template, 2)
            for start, end in ((0, 0), (0, 5), (3, 11), (80, 88)):
                exact = memory.stage(
                    shape(
                        start,
                        end,
                        has_embedding=True,
                        has_head=has_head,
                        recompute=recompute,
                        expert_shards=2,
                    ),
                    2,
                ).total
                assert total(start, end) == pytest.approx(exact)


def test_usable_memory_leaves_headroom() -> None:
    memory = MemoryModel(PRESETS["tiny"], 128, Assumptions())
    assert memory.usable_bytes(grade("x", 1, 80, 1)) == pytest.approx(72 * GIB)
    assert memory.model_state_bytes() == 18 * PRESETS["tiny"].total_params


def test_fast_total_matches_the_breakdown_when_interleaved() -> None:
    memory = MemoryModel(PRESETS["ling-plus"], 4096, Assumptions())
    peaks = interleaved_peaks(8, 2, 0, 32)
    for recompute in (False, True):
        template = shape(0, 0, recompute=recompute, peaks=peaks)
        total = memory.stage_total_fn(template, 2)
        for start, end in ((0, 2), (0, 5), (3, 11)):
            chunks = split_chunk(start, end, 2)
            exact = memory.stage(
                shape(
                    start,
                    end,
                    has_embedding=True,
                    recompute=recompute,
                    peaks=peaks,
                    chunks=chunks,
                ),
                2,
            ).total
            assert total(start, end) == pytest.approx(exact)


def test_interleaved_chunks_hold_more_activations_than_1f1b() -> None:
    memory = MemoryModel(PRESETS["ling-lite"], 4096, Assumptions())
    plain = memory.stage(shape(0, 8, in_flight=8), 1)
    chunked = memory.stage(
        shape(0, 8, chunks=((0, 4), (16, 20)), peaks=interleaved_peaks(8, 2, 0, 32)), 1
    )
    # position 0 of 8: 1F1B holds 8 microbatches, interleaving 8 + 7 / 2 stage-equivalents
    assert chunked.activations / plain.activations == pytest.approx(11.5 / 8, rel=0.05)
    assert chunked.weights == pytest.approx(plain.weights)
