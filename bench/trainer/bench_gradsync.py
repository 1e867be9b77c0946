"""Step time with the gradient all-reduce overlapped with backward vs after it (dp=2, CPU).

Two gloo processes (forked, one data-parallel replica each) build two trainers of
the same model in the same processes: one reduces gradient buckets from
post-accumulate-grad hooks during backward, the other after backward. Rounds
alternate the two (``--steps`` timed steps each, after a warm-up step), so both see
the same machine load; the table reports each mode's median step time over all
rounds and the ratio of the medians, plus rank 0's median ``grad_sync`` phase
(the time the step still waits for reductions after backward).

    python bench/trainer/bench_gradsync.py [--rounds 5 --steps 4 --bucket-mib 1]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from hetmoe_operator.api.model import ModelArchitecture
from hetmoe_operator.api.training import TrainingConfig
from hetmoe_operator.plan import ParallelDegrees, Plan, RankPlan, ReplicaPlan, StagePlan
from hetmoe_trainer.distributed import build_context, pick_device
from hetmoe_trainer.loop import Trainer, TrainerOptions

DP = 2


def make_plan(hidden: int, layers: int, seq: int) -> Plan:
    """dp=2, pp=1, ep=1: every parameter's gradient is reduced over both replicas."""
    experts = 8
    arch = ModelArchitecture(
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_experts=experts,
        num_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=hidden,
        vocab_size=8192,
        max_position_embeddings=512,
    )
    return Plan(
        model=arch,
        training=TrainingConfig(steps=10**6, global_batch_size=4 * DP, sequence_length=seq),
        parallel=ParallelDegrees(pp=1, dp=DP, ep=1),
        stages=[
            StagePlan(index=0, layer_start=0, layer_end=layers, has_embedding=True, has_head=True)
        ],
        replicas=[
            ReplicaPlan(dp_index=j, samples_per_step=4, microbatch_size=2, num_microbatches=2)
            for j in range(DP)
        ],
        ranks=[
            RankPlan(
                rank=j,
                pool="local",
                grade="cpu",
                node_slot=0,
                local_rank=j,
                stage=0,
                dp_index=j,
                ep_group=j,
                ep_rank=0,
                experts=list(range(experts)),
            )
            for j in range(DP)
        ],
    )


def timed_steps(trainer: Trainer, steps: int) -> tuple[list[float], list[float]]:
    """Wall seconds of ``steps`` train steps, and their grad_sync phase seconds."""
    walls, waits = [], []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        trainer.train_step()
        walls.append(time.perf_counter() - start)
        waits.append(trainer.history[-1]["phases"]["grad_sync"])
    return walls, waits


def worker(rank: int, port: int, args: argparse.Namespace, results: multiprocessing.Queue) -> None:
    """One replica: both trainers, alternating rounds."""
    torch.set_num_threads(args.threads)
    store = dist.TCPStore("127.0.0.1", port, DP, rank == 0)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=DP)
    plan = make_plan(args.hidden, args.layers, args.seq)
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {
            overlap: Trainer(
                build_context(plan, rank, pick_device(0)),
                TrainerOptions(
                    checkpoint_dir=Path(tmp) / str(overlap),
                    checkpoint_interval=10**9,
                    peak_flops=1.0,
                    overlap_grad_sync=overlap,
                    grad_bucket_bytes=int(args.bucket_mib * (1 << 20)),
                ),
            )
            for overlap in (False, True)
        }
        for trainer in trainers.values():
            trainer.train_step()  # warm-up: lazy allocations, first collectives
        walls: dict[bool, list[float]] = {False: [], True: []}
        waits: dict[bool, list[float]] = {False: [], True: []}
        buckets = (0, 0)
        for _ in range(args.rounds):
            for overlap, trainer in trainers.items():
                w, s = timed_steps(trainer, args.steps)
                walls[overlap] += w
                waits[overlap] += s
        buckets = (
            len(trainers[True].sync.buckets),
            trainers[True].history[-1]["overlapped_buckets"],
        )
        params = sum(p.numel() for p in trainers[True].stage.parameters())
    dist.destroy_process_group()
    if rank == 0:
        results.put({"walls": walls, "waits": waits, "buckets": buckets, "params": params})


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    """Measure and print a table and JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--bucket-mib", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    context = multiprocessing.get_context("fork")
    results: multiprocessing.Queue = context.Queue()
    port = free_port()
    procs = [context.Process(target=worker, args=(r, port, args, results)) for r in range(DP)]
    load_before = os.getloadavg()[0]
    for proc in procs:
        proc.start()
    got = results.get(timeout=3600)
    for proc in procs:
        proc.join()
    plain = statistics.median(got["walls"][False])
    overlap = statistics.median(got["walls"][True])
    result = {
        "params": got["params"],
        "buckets": got["buckets"][0],
        "buckets_launched_in_backward": got["buckets"][1],
        "steps_per_mode": len(got["walls"][False]),
        "after_backward_step_s": plain,
        "overlapped_step_s": overlap,
        "after_backward_wait_s": statistics.median(got["waits"][False]),
        "overlapped_wait_s": statistics.median(got["waits"][True]),
        "overlapped_over_after_backward": overlap / plain,
        "load_average_1m_before": load_before,
        "load_average_1m_after": os.getloadavg()[0],
    }
    print(
        f"{result['params'] / 1e6:.1f}M parameters, {result['buckets']} buckets "
        f"({result['buckets_launched_in_backward']} left during backward), dp={DP}, "
        f"{result['steps_per_mode']} steps per mode"
    )
    print(f"{'mode':<16}{'step s (median)':>17}{'grad_sync wait s':>18}")
    print(f"{'after backward':<16}{plain:>17.4f}{result['after_backward_wait_s']:>18.4f}")
    print(f"{'overlapped':<16}{overlap:>17.4f}{result['overlapped_wait_s']:>18.4f}")
    print(f"ratio overlapped / after backward: {result['overlapped_over_after_backward']:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
