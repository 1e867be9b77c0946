"""Async checkpoint blocking time vs a synchronous save of the same state.

One process, a model of about ``--hidden``/``--layers`` size with its AdamW state
(after one real step, so the optimizer moments exist). For each repeat the trainer
saves once synchronously and once asynchronously. The blocking time is what the
training loop loses: the time of ``save()`` plus the extra time of the following
training step over a step without a save (for async, the optimizer step waits for
the background staging copy if it is still running; the disk write never blocks).
Both modes use one checkpointer for the whole run, as the trainer does; the first
save of each (which allocates the async staging buffers) is a warm-up reported
apart, and medians of the following ``--repeats`` saves are reported.

    python bench/trainer/bench_checkpoint.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from hetmoe_operator.api.model import ModelArchitecture
from hetmoe_operator.api.training import TrainingConfig
from hetmoe_operator.plan import Plan
from hetmoe_trainer.checkpoint import Checkpointer
from hetmoe_trainer.distributed import build_context, pick_device
from hetmoe_trainer.loop import Trainer, TrainerOptions


def make_trainer(workdir: Path, hidden: int, layers: int) -> Trainer:
    """A single-process trainer of a mid-size MoE (a few hundred MB of state)."""
    arch = ModelArchitecture(
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_experts=16,
        num_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=hidden,
        vocab_size=8192,
        max_position_embeddings=512,
    )
    training = TrainingConfig(steps=100, global_batch_size=1, sequence_length=32)
    plan = Plan.single_process(arch, training, microbatch_size=1)
    options = TrainerOptions(checkpoint_dir=workdir, checkpoint_interval=10**9, peak_flops=1.0)
    return Trainer(build_context(plan, 0, pick_device(0)), options)


def timed(fn: Callable[[], object]) -> float:
    """Seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    """Measure and print a table and JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    sync_s, async_s, total_async_s, direct_s = [], [], [], []
    first_async_s = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(Path(tmp) / "run", args.hidden, args.layers)
        trainer.train_step()
        state_bytes = sum(
            v.numel() * v.element_size()
            for v in trainer.state().values()
            if isinstance(v, torch.Tensor)
        )
        # One checkpointer per mode for the whole run, as in training: the async one
        # allocates its staging buffers on its first save and refills them afterwards.
        sync = Checkpointer(Path(tmp) / "sync", None, keep=1, use_async=False)
        async_ = Checkpointer(Path(tmp) / "async", None, keep=1, use_async=True)
        waited: list[float] = []
        wait_staged = async_.wait_staged

        def timed_wait_staged() -> None:
            waited.append(timed(wait_staged))

        async_.wait_staged = timed_wait_staged  # type: ignore[method-assign]
        for repeat in range(args.repeats + 1):
            # Median of three plain steps: one step under load is too noisy a baseline.
            baseline = statistics.median(timed(trainer.train_step) for _ in range(3))
            trainer.checkpointer = sync
            sync_s.append(timed(lambda: trainer.save()) + timed(trainer.train_step) - baseline)
            trainer.checkpointer = async_
            start = time.perf_counter()
            # The loop's view: save, then the next step (whose optimizer step waits for
            # the background staging copy if it has not finished yet, and whose compute
            # shares the cores with the copy).
            waited.clear()
            call = timed(lambda: trainer.save())
            async_s.append(call + timed(trainer.train_step) - baseline)
            direct_s.append(call + sum(waited))
            async_.wait()
            total_async_s.append(time.perf_counter() - start)
            if repeat == 0:  # the first save allocates the staging buffers: reported apart
                first_async_s = async_s.pop()
                for series in (sync_s, total_async_s, direct_s):
                    series.pop()
        async_.close()
    dist.destroy_process_group()
    result = {
        "state_mib": state_bytes / 2**20,
        "sync_save_s": statistics.median(sync_s),
        "async_blocking_s": statistics.median(async_s),
        "async_total_s": statistics.median(total_async_s),
        "async_waited_s": statistics.median(direct_s),
        "first_async_blocking_s": first_async_s,
        "load_average_1m": os.getloadavg()[0],
    }
    result["blocking_fraction"] = result["async_blocking_s"] / result["sync_save_s"]
    print(f"state {result['state_mib']:.0f} MiB")
    print(f"{'mode':<20}{'seconds':>10}")
    print(f"{'sync save':<20}{result['sync_save_s']:>10.3f}")
    print(f"{'async (blocking)':<20}{result['async_blocking_s']:>10.3f}")
    print(f"{'async (waited only)':<20}{result['async_waited_s']:>10.3f}")
    print(f"{'async (to durable)':<20}{result['async_total_s']:>10.3f}")
    print(f"{'first async (alloc)':<20}{result['first_async_blocking_s']:>10.3f}")
    print(f"blocking fraction {result['blocking_fraction']:.1%} (target <= 10%)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
