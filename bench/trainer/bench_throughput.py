"""Training throughput of the hetmoe trainer vs Hugging Face transformers' Qwen2-MoE.

Same machine, same process, same minute, same dtype (fp32 on CPU), same thread count
(pinned with ``torch.set_num_threads``), same layer sizes: hidden, layers, heads/kv
heads, experts, top-k, expert width, one shared expert of the same width, vocabulary,
sequence length and batch. Each side runs a full training step (forward, backward,
AdamW); ours is ``Trainer.train_step`` (data, anomaly statistics and all). Runs are
interleaved and the median of ``--repeats`` timed steps is reported, plus MFU against
a square-matmul peak measured in the same run.

HF runs twice: with ``torch.optim.AdamW``'s default implementation (a per-tensor loop
on CPU) and with ``fused=True``, which is what HF's own ``Trainer`` uses by default
with torch >= 2.8 (``optim="adamw_torch_fused"``). The speedup against the faster of
the two is the headline. Under fluctuating load the per-round ratio (ours vs each
HF variant timed right after it, median over rounds), the ratio of the fastest
steps and the ratio of median process CPU seconds per step (less sensitive to
waiting for a core, though OpenMP spin-waits count) are printed as well.
``--compile`` turns on our regional ``torch.compile`` (``TrainerOptions.compile``);
the first (warm-up) step then includes compilation, reported as
``ours_first_step_s``.

``--ep N`` instead trains ARCH expert-parallel over N gloo processes on this machine
(dp = ep = N, routed experts split evenly, ``--threads`` each, no HF run) and reports
the median step time with the EP exchanges' exposed time (the host blocked on an
all-to-all) and in-flight time (launch to end of wait); their difference is the
compute run while exchanges were in flight, an upper bound on what was hidden.

    python bench/trainer/bench_throughput.py [--threads 2] [--repeats 5] [--compile]
    python bench/trainer/bench_throughput.py --ep 2 --threads 1 [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

from hetmoe_operator.api.model import ModelArchitecture
from hetmoe_operator.api.training import LearningRateSchedule, TrainingConfig
from hetmoe_operator.plan import ParallelDegrees, Plan, RankPlan, ReplicaPlan, StagePlan
from hetmoe_trainer.distributed import build_context, pick_device
from hetmoe_trainer.loop import Trainer, TrainerOptions
from hetmoe_trainer.metrics import flops_per_token, measure_matmul_peak

ARCH = ModelArchitecture(
    num_hidden_layers=4,
    hidden_size=256,
    num_attention_heads=8,
    num_key_value_heads=4,
    num_experts=16,
    num_shared_experts=1,
    num_experts_per_tok=2,
    moe_intermediate_size=256,
    vocab_size=4096,
    max_position_embeddings=1024,
    rope_theta=10000.0,
)
BATCH, SEQ = 4, 256


def our_plan(ep: int = 1) -> Plan:
    """ARCH on one stage; ``ep`` > 1: that many replicas forming one EP group."""
    training = TrainingConfig(
        steps=10_000,
        global_batch_size=BATCH * ep,
        sequence_length=SEQ,
        lr=LearningRateSchedule(peak=1e-4, warmup_steps=1, decay="constant"),
    )
    per_rank = ARCH.num_experts // ep
    return Plan(
        model=ARCH,
        training=training,
        parallel=ParallelDegrees(pp=1, dp=ep, ep=ep),
        stages=[StagePlan.whole_model(ARCH)],
        replicas=[
            ReplicaPlan(
                dp_index=j, samples_per_step=BATCH, microbatch_size=BATCH, num_microbatches=1
            )
            for j in range(ep)
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
                ep_group=0,
                ep_rank=j,
                experts=list(range(j * per_rank, (j + 1) * per_rank)),
            )
            for j in range(ep)
        ],
    )


def our_trainer(
    workdir: Path, *, compile_regions: bool = False, ep: int = 1, rank: int = 0
) -> Trainer:
    """The trainer of rank ``rank`` of :func:`our_plan` (the default group must exist)."""
    options = TrainerOptions(
        checkpoint_dir=workdir,
        checkpoint_interval=10**9,
        peak_flops=1.0,
        compile=compile_regions,
    )
    return Trainer(build_context(our_plan(ep), rank, pick_device(0)), options)


def hf_step_fn(*, fused: bool = False) -> tuple[Callable[[], None], str]:
    """A Qwen2-MoE of the same sizes, its AdamW training step and its experts kernel.

    transformers 5 stores the experts stacked ([E, 2I, H] gate+up, [E, H, I] down) and
    picks ``grouped_mm`` when torch has it: the baseline is HF's fastest CPU path.
    """
    config = Qwen2MoeConfig(
        vocab_size=ARCH.vocab_size,
        hidden_size=ARCH.hidden_size,
        intermediate_size=ARCH.moe_intermediate_size,
        num_hidden_layers=ARCH.num_hidden_layers,
        num_attention_heads=ARCH.num_attention_heads,
        num_key_value_heads=ARCH.num_key_value_heads,
        max_position_embeddings=ARCH.max_position_embeddings,
        moe_intermediate_size=ARCH.moe_intermediate_size,
        shared_expert_intermediate_size=ARCH.moe_intermediate_size * ARCH.num_shared_experts,
        num_experts=ARCH.num_experts,
        num_experts_per_tok=ARCH.num_experts_per_tok,
        norm_topk_prob=True,
        qkv_bias=False,
        output_router_logits=True,
        router_aux_loss_coef=0.015,
        use_cache=False,
    )
    model = Qwen2MoeForCausalLM(config).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=fused or None
    )
    ids = torch.randint(0, ARCH.vocab_size, (BATCH, SEQ))

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, str(model.config._experts_implementation)


def timed(fn: Callable[[], object], cpu: list[float] | None = None) -> float:
    """Wall seconds of one call; appends the process CPU seconds it used to ``cpu``."""
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    if cpu is not None:
        cpu.append(time.process_time() - start_cpu)
    return time.perf_counter() - start


def _ep_worker(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
    """One EP member: warm up, then time ``--repeats`` steps started together."""
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.ep
    )
    with tempfile.TemporaryDirectory() as tmp:
        trainer = our_trainer(Path(tmp), compile_regions=args.compile, ep=args.ep, rank=rank)
        timer = trainer.context.expert_parallel.timer
        rows = []
        for i in range(args.warmup + args.repeats):
            dist.barrier()
            exposed, in_flight = timer.seconds, timer.in_flight_seconds
            seconds = timed(trainer.train_step)
            if i >= args.warmup:
                rows.append(
                    {
                        "step_s": seconds,
                        "exposed_s": timer.seconds - exposed,
                        "in_flight_s": timer.in_flight_seconds - in_flight,
                    }
                )
    dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(rows))


def run_ep(args: argparse.Namespace) -> None:
    """``--ep``: step time and exposed vs in-flight all-to-all of rank 0, as a table and JSON."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rows.json")
        mp.start_processes(_ep_worker, args=(args, port, out), nprocs=args.ep, start_method="fork")
        rows = json.loads(Path(out).read_text())
    median = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
    result = {
        "ep": args.ep,
        "threads": args.threads,
        "load_average_1m": os.getloadavg()[0],
        "tokens_per_step": BATCH * SEQ * args.ep,
        "median": median,
        "overlapped_share": statistics.median(
            1 - row["exposed_s"] / row["in_flight_s"] for row in rows if row["in_flight_s"]
        ),
        "steps": rows,
    }
    print(f"{'ep':>4}{'step s':>10}{'a2a exposed s':>16}{'a2a in flight s':>18}{'overlapped':>12}")
    print(
        f"{args.ep:>4}{median['step_s']:>10.3f}{median['exposed_s']:>16.3f}"
        f"{median['in_flight_s']:>18.3f}{result['overlapped_share']:>12.0%}"
    )
    print(json.dumps(result))


def main() -> None:
    """Run the comparison and print a table and JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--compile", action="store_true", help="regional torch.compile of our layers"
    )
    parser.add_argument(
        "--ep", type=int, default=1, help="> 1: expert-parallel run over this many processes"
    )
    args = parser.parse_args()
    if args.ep > 1:
        if ARCH.num_experts % args.ep:
            parser.error(f"--ep must divide the {ARCH.num_experts} experts")
        run_ep(args)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    with tempfile.TemporaryDirectory() as tmp:
        ours = our_trainer(Path(tmp), compile_regions=args.compile)
        hf, hf_experts = hf_step_fn()
        hf_fused, _ = hf_step_fn(fused=True)
        steps = {"ours": ours.train_step, "hf": hf, "hf_fused": hf_fused}
        first = timed(ours.train_step)
        for _ in range(args.warmup):
            for fn in steps.values():
                fn()
        seconds: dict[str, list[float]] = {name: [] for name in steps}
        cpu_seconds: dict[str, list[float]] = {name: [] for name in steps}
        peaks = []
        for _ in range(args.repeats):
            for name, fn in steps.items():
                seconds[name].append(timed(fn, cpu_seconds[name]))
            peaks.append(measure_matmul_peak(torch.device("cpu"), torch.float32))
    dist.destroy_process_group()

    tokens = BATCH * SEQ
    flops = flops_per_token(ARCH, SEQ)
    peak = statistics.median(peaks)
    rate = {name: tokens / statistics.median(s) for name, s in seconds.items()}
    result: dict[str, object] = {
        "threads": args.threads,
        "compile": args.compile,
        "hf_experts_implementation": hf_experts,
        "load_average_1m": os.getloadavg()[0],
        "tokens_per_step": tokens,
        "matmul_peak_gflops": peak / 1e9,
        "ours_first_step_s": first,
        "ours_tokens_per_s": rate["ours"],
        "hf_qwen2moe_tokens_per_s": rate["hf"],
        "hf_qwen2moe_fused_adamw_tokens_per_s": rate["hf_fused"],
        "speedup_vs_hf": rate["ours"] / rate["hf"],
        "speedup_vs_hf_fused_adamw": rate["ours"] / rate["hf_fused"],
        "speedup": rate["ours"] / max(rate["hf"], rate["hf_fused"]),
        "round_ratio_median": {
            name: statistics.median(
                b / a for a, b in zip(seconds["ours"], seconds[name], strict=True)
            )
            for name in ("hf", "hf_fused")
        },
        "cpu_time_ratio": {
            name: statistics.median(cpu_seconds[name]) / statistics.median(cpu_seconds["ours"])
            for name in ("hf", "hf_fused")
        },
        "fastest_step_ratio": {
            name: min(seconds[name]) / min(seconds["ours"]) for name in ("hf", "hf_fused")
        },
        "ours_mfu": rate["ours"] * flops / peak,
        "hf_mfu": rate["hf"] * flops / peak,
        "hf_fused_adamw_mfu": rate["hf_fused"] * flops / peak,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
    }
    labels = {
        "ours": "hetmoe trainer",
        "hf": "HF Qwen2-MoE",
        "hf_fused": "HF + fused AdamW",
    }
    print(f"{'implementation':<24}{'tokens/s':>12}{'MFU':>8}{'ratio':>8}")
    for name, label in labels.items():
        print(
            f"{label:<24}{rate[name]:>12.0f}{rate[name] * flops / peak:>8.1%}"
            f"{rate['ours'] / rate[name]:>7.2f}x"
        )
    print(
        f"per-round ratio (median) {result['round_ratio_median']}; "
        f"fastest-step ratio {result['fastest_step_ratio']}; "
        f"CPU-time ratio {result['cpu_time_ratio']}"
    )
    print(
        f"speedup {result['speedup']:.2f}x vs the faster HF variant (target >= 1.5x); "
        f"matmul peak {peak / 1e9:.1f} GFLOP/s; our first step {first:.1f} s"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
