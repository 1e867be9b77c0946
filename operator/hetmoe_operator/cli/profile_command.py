"""``hetmoe profile``: measure this machine's speed per operation class on a model.

Runs the bundled trainer model (one process, every layer and expert local) and times
forward + backward of each operation class the planner's cost model knows: one
layer's attention block, one MoE block, one dense FFN block, embedding + LM head +
loss, and one AdamW step, each at two microbatch sizes (seconds per token plus fixed
seconds per microbatch), in CPU time. The medians become a profile file
(``DeviceProfile``) whose effective TFLOP/s a catalog grade can carry as ``measured``
(printed as a snippet) or ``hetmoe plan --profile GRADE=FILE`` can apply, instead of
peak x efficiency.

It also times, in wall-clock seconds, gloo ``all_reduce``, ``all_to_all_single`` and
one-way ``send``/``recv`` between two spawned local processes at three message sizes
and fits ``latency + bytes / bandwidth`` to each (``CommunicationProfile``): on a CPU a
collective costs around a millisecond, not the catalog default's tens of microseconds.

torch and the trainer are imported only when the command runs: the rest of the CLI
does not need them.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from hetmoe_operator.api.manifests import read_yaml
from hetmoe_operator.api.model import PRESETS, ModelArchitecture
from hetmoe_operator.api.training import TrainingConfig
from hetmoe_operator.errors import UserError, describe_validation_error
from hetmoe_operator.placement.profile import (
    CommunicationProfile,
    DeviceProfile,
    LinkFit,
    OperationSeconds,
    shared_throughput,
    throughput_from_seconds,
)

_WARMUP = 3
_COMM_PROCESSES = 2
_COMM_SIZES = (64, 256 << 10, 4 << 20)
"""Message bytes timed per primitive: latency-bound, mid-size and bandwidth-bound."""


def register(subparsers: Any) -> None:
    """Add the ``profile`` sub-command."""
    parser = subparsers.add_parser(
        "profile",
        help="measure per-operation speed of this machine for the planner",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model preset")
    parser.add_argument("--sequence-length", type=int, default=64, help="tokens per sequence")
    parser.add_argument(
        "--microbatch-size",
        type=int,
        default=1,
        help="sequences per microbatch (also timed at 4x this, to separate fixed costs)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (torchrun workers use 1)"
    )
    parser.add_argument("--repeats", type=int, default=30, help="timed repetitions (median)")
    parser.add_argument("-o", "--output", type=Path, help="write the profile (YAML) here")
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="for the printed catalog snippet: worker processes that will share this "
        "machine's cores (local mode: every device of the local cluster)",
    )
    parser.add_argument(
        "--no-communication",
        action="store_true",
        help="skip timing gloo collectives between two local processes",
    )
    parser.set_defaults(handler=run)


def _cpu_seconds(call: Callable[[], None], repeats: int) -> float:
    """Median CPU seconds of ``repeats`` calls.

    CPU time, not wall time: with one thread it is what the operation costs a core
    of its own, whatever else the machine runs (wall-clock timings on a shared
    machine vary several-fold with its load); sharing cores among the job's own
    processes is modelled separately (``shared_throughput``).
    """
    for _ in range(_WARMUP):
        call()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        call()
        times.append(time.process_time() - start)
    return statistics.median(times)


def _fit(small: float, large: float, small_tokens: int, large_tokens: int) -> tuple[float, float]:
    """(seconds per token, fixed seconds) of the line through two timings; noise that
    would make either negative falls back to the larger microbatch's average."""
    slope = (large - small) / (large_tokens - small_tokens)
    fixed = small - slope * small_tokens
    if slope <= 0 or fixed < 0:
        return large / large_tokens, 0.0
    return slope, fixed


def measure(
    model: ModelArchitecture, sequence_length: int, microbatch_size: int, repeats: int
) -> OperationSeconds:
    """Forward + backward seconds per token and per microbatch of each operation class,
    from timings at ``microbatch_size`` and 4x that."""
    sizes = (microbatch_size, 4 * microbatch_size)
    small, large = (_measure_once(model, sequence_length, size, repeats) for size in sizes)
    tokens = [size * sequence_length for size in sizes]
    fitted = {
        name: _fit(small[name], large[name], tokens[0], tokens[1])
        for name in ("attention", "expert_ffn", "dense_ffn", "embedding")
    }
    return OperationSeconds(
        **{name: slope for name, (slope, _) in fitted.items()},
        **{f"{name}_fixed": fixed for name, (_, fixed) in fitted.items()},
        optimizer=min(small["optimizer"], large["optimizer"]),
    )


def _measure_once(
    model: ModelArchitecture, sequence_length: int, microbatch_size: int, repeats: int
) -> dict[str, float]:
    """Median forward + backward CPU seconds per microbatch of each operation class
    (the optimizer: per parameter)."""
    import torch
    import torch.nn.functional as functional

    from hetmoe_operator.plan import StagePlan
    from hetmoe_trainer.model import ExpertParallel, build_stage
    from hetmoe_trainer.model.experts import SwiGLU
    from hetmoe_trainer.model.moe import MoE
    from hetmoe_trainer.model.rope import rope_tables
    from hetmoe_trainer.optim import build_optimizer

    torch.manual_seed(0)
    training = TrainingConfig(
        steps=1, global_batch_size=microbatch_size, sequence_length=sequence_length
    )
    stage_plan = StagePlan(
        index=0,
        layer_start=0,
        layer_end=model.num_hidden_layers,
        has_embedding=True,
        has_head=True,
    )
    ep = ExpertParallel(None, [list(range(model.num_experts))], 0)
    stage = build_stage(model, stage_plan, training, ep, device="cpu")
    hidden = torch.randn(microbatch_size, sequence_length, model.hidden_size, requires_grad=True)
    cos, sin = rope_tables(
        sequence_length,
        model.resolved_head_dim,
        model.rope_theta,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    layers = list(stage.layers.values())
    moe_layer = next(layer for layer in layers if isinstance(layer.mlp, MoE))
    dense_layer = next((layer for layer in layers if not isinstance(layer.mlp, MoE)), None)
    step = training.routing_warmup_steps + 1

    def attention() -> None:
        out = moe_layer.attention(moe_layer.input_layernorm(hidden), cos, sin)
        out.sum().backward()

    def expert_ffn() -> None:
        out = moe_layer.mlp(moe_layer.post_attention_layernorm(hidden), step)
        out.sum().backward()

    dense_mlp = (
        dense_layer.mlp
        if dense_layer is not None
        else SwiGLU(model.hidden_size, model.intermediate_size or 4 * model.hidden_size)
    )
    dense_norm = (dense_layer or moe_layer).post_attention_layernorm

    def dense_ffn() -> None:
        dense_mlp(dense_norm(hidden)).sum().backward()

    ids = torch.randint(0, model.vocab_size, (microbatch_size, sequence_length))

    def embedding() -> None:
        logits = stage.head(stage.norm(stage.embed(ids))).float()
        loss = functional.cross_entropy(logits.view(-1, model.vocab_size), ids.view(-1))
        loss.backward()

    params = list(stage.named_parameters())
    for _, param in params:
        param.grad = torch.randn_like(param) * 1e-3
    optimizer = build_optimizer(params, weight_decay=0.1)
    for group in optimizer.param_groups:
        group["lr"] = 1e-4
    count = sum(p.numel() for _, p in params)
    with torch.no_grad():
        optimizer_seconds = _cpu_seconds(optimizer.step, repeats)
    return {
        "attention": _cpu_seconds(attention, repeats),
        "expert_ffn": _cpu_seconds(expert_ffn, repeats),
        "dense_ffn": _cpu_seconds(dense_ffn, repeats),
        "embedding": _cpu_seconds(embedding, repeats),
        "optimizer": optimizer_seconds / count,
    }


def _time_primitives(rank: int, port: int, repeats: int, out: str) -> None:
    """One of the two spawned processes: wall seconds per call of each primitive and
    message size (rank 0 writes them as JSON to ``out``)."""
    import json

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=_COMM_PROCESSES
    )
    try:
        results: dict[str, list[list[float]]] = {"all_reduce": [], "all_to_all": [], "p2p": []}
        for size in _COMM_SIZES:
            x = torch.ones(max(1, size // 4))
            y = torch.empty_like(x)
            peer = 1 - rank

            def ping_pong(x: torch.Tensor = x, y: torch.Tensor = y, peer: int = peer) -> None:
                if rank == 0:
                    dist.send(x, peer)
                    dist.recv(y, peer)
                else:
                    dist.recv(y, peer)
                    dist.send(x, peer)

            calls: dict[str, Callable[[], object]] = {
                "all_reduce": partial(dist.all_reduce, x),
                "all_to_all": partial(dist.all_to_all_single, y, x),
                "p2p": ping_pong,
            }
            for name, call in calls.items():
                for _ in range(_WARMUP):
                    call()
                times = []
                for _ in range(repeats):
                    dist.barrier()
                    start = time.perf_counter()
                    call()
                    times.append(time.perf_counter() - start)
                seconds = statistics.median(times) / (2 if name == "p2p" else 1)
                results[name].append([float(x.numel() * 4), seconds])
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _fit_link(points: list[list[float]], moved: float) -> LinkFit:
    """``latency + moved x bytes / bandwidth`` from (bytes, seconds) points, smallest
    message first. Bandwidth is the slope between the two largest messages; latency is
    the smallest message's time less its (tiny) transfer. A least-squares intercept is
    dominated by the noise of the large messages and often lands at or below zero, which
    would tell the planner that collectives are free. ``moved`` is the share of the
    payload each rank sends in the cost model."""
    ordered = sorted((moved * size, seconds) for size, seconds in points)
    (small_bytes, small_seconds), (mid_bytes, mid_seconds), (large_bytes, large_seconds) = (
        ordered[0],
        ordered[-2],
        ordered[-1],
    )
    slope = (large_seconds - mid_seconds) / (large_bytes - mid_bytes)
    if slope <= 0:  # noise swamped the size dependence: largest message's average
        slope = large_seconds / large_bytes
    latency = max(small_seconds - small_bytes * slope, small_seconds / 2)
    return LinkFit(latency_seconds=latency, gbps=1.0 / slope / 1e9)


def measure_communication(repeats: int) -> CommunicationProfile:
    """Wall-clock latency and bandwidth of gloo all-reduce, all-to-all and send/recv
    between two spawned local processes (what local-mode workers use)."""
    import json
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="hetmoe-profile-") as tmp:
        out = str(Path(tmp) / "communication.json")
        mp.spawn(_time_primitives, args=(port, repeats, out), nprocs=_COMM_PROCESSES)
        results = json.loads(Path(out).read_text())
    n = _COMM_PROCESSES
    return CommunicationProfile(
        backend="gloo",
        processes=n,
        all_reduce=_fit_link(results["all_reduce"], 2.0 * (n - 1) / n),
        all_to_all=_fit_link(results["all_to_all"], (n - 1) / n),
        send_recv=_fit_link(results["p2p"], 1.0),
    )


def make_profile(
    preset: str,
    sequence_length: int,
    microbatch_size: int,
    threads: int,
    repeats: int,
    communication: bool = True,
) -> DeviceProfile:
    """Measure ``preset`` on this machine with ``threads`` torch threads (and, unless
    ``communication`` is False, gloo collectives between two local processes)."""
    import torch

    for name, value in (
        ("--sequence-length", sequence_length),
        ("--microbatch-size", microbatch_size),
        ("--threads", threads),
        ("--repeats", repeats),
    ):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    model = PRESETS[preset]
    if sequence_length > model.max_position_embeddings:
        raise UserError(
            f"--sequence-length {sequence_length} exceeds the {preset} preset's "
            f"{model.max_position_embeddings} positions"
        )
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        seconds = measure(model, sequence_length, microbatch_size, repeats)
    finally:
        torch.set_num_threads(previous)
    device = (
        f"cpu ({platform.machine()}, {os.cpu_count()} cores), {threads} thread"
        f"{'s' if threads > 1 else ''}"
    )
    source = f"hetmoe profile: {preset}, {device}, {time.strftime('%Y-%m-%d')}"
    return DeviceProfile(
        device=device,
        threads=threads,
        cores=os.cpu_count() or 1,
        model=model,
        sequence_length=sequence_length,
        microbatch_size=microbatch_size,
        repeats=repeats,
        seconds=seconds,
        throughput=throughput_from_seconds(model, sequence_length, seconds, source),
        communication=measure_communication(repeats) if communication else None,
    )


def profile_yaml(profile: DeviceProfile) -> str:
    """The profile file's text."""
    return yaml.safe_dump(profile.to_wire(), sort_keys=False)


def load_profile(path: Path) -> DeviceProfile:
    """A profile file written by ``hetmoe profile``; bad files become UserErrors."""
    data = read_yaml(path)
    try:
        return DeviceProfile.model_validate(data)
    except ValidationError as error:
        raise UserError(describe_validation_error(error, str(path))) from None


def run(args: argparse.Namespace) -> int:
    """Measure, print a table and a catalog snippet, and optionally write the profile."""
    if args.processes < 1:
        raise UserError(f"--processes must be at least 1, got {args.processes}")
    profile = make_profile(
        args.preset,
        args.sequence_length,
        args.microbatch_size,
        args.threads,
        args.repeats,
        communication=not args.no_communication,
    )
    print(f"# {profile.device}; {args.preset}, {args.microbatch_size} x {args.sequence_length}")
    print(
        f"{'operation':<12} {'us/token (fwd+bwd)':>20} {'ms/microbatch fixed':>20} "
        f"{'effective TFLOP/s':>18}"
    )
    for name in ("attention", "expert_ffn", "dense_ffn", "embedding", "optimizer"):
        seconds = getattr(profile.seconds, name)
        if name == "optimizer":
            value, fixed = f"{seconds * 1e9:.3f} ns/param", "-"
        else:
            value = f"{seconds * 1e6:.3f}"
            fixed = f"{getattr(profile.seconds, f'{name}_fixed') * 1e3:.3f}"
        print(f"{name:<12} {value:>20} {fixed:>20} {getattr(profile.throughput, name):>18.5f}")
    comm = profile.communication
    if comm is not None:
        print(f"\n{'collective (' + comm.backend + ')':<20} {'latency us':>12} {'GB/s':>10}")
        for name in ("all_reduce", "all_to_all", "send_recv"):
            link = getattr(comm, name)
            print(f"{name:<20} {link.latency_seconds * 1e6:>12.1f} {link.gbps:>10.3f}")
    if args.output:
        args.output.write_text(profile_yaml(profile))
        print(f"wrote {args.output}")
    snippet = shared_throughput(profile, args.processes).to_wire()
    print(f"\n# catalog grade snippet for {args.processes} process(es) on {profile.cores} cores:")
    print(yaml.safe_dump({"measured": snippet}, sort_keys=False), end="")
    return 0
