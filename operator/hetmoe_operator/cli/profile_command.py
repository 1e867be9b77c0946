"""``hetmoe profile``: measure this machine's speed per operation class on a model.

Runs the bundled trainer model (one process, every layer and expert local) and times
forward + backward of each operation class the planner's cost model knows: one
layer's attention block, one MoE block, one dense FFN block, embedding + LM head +
loss, and one AdamW step, each at two microbatch sizes (seconds per token plus fixed
seconds per microbatch), in CPU time. Classes in isolation miss part of a real step
(autograd over the whole model, activations of every layer in the caches, the loss,
the gradient norm, statistics, anomaly detector, bookkeeping), so it also times the
trainer's own ``Trainer.train_step`` in one process at five shapes (one microbatch
of 1x, 4x and 16x ``--microbatch-size``, four of 1x and 4x) and fits seconds per
token, per microbatch and per step (``StepSeconds``); the classes are scaled to
reproduce it. The medians become a profile file (``DeviceProfile``) whose effective
TFLOP/s a catalog grade can carry as ``measured`` (printed as a snippet) or
``hetmoe plan --profile GRADE=FILE`` can apply, instead of peak x efficiency.

It also times, in wall-clock seconds, gloo ``all_reduce``, ``all_to_all_single`` and
one-way ``send``/``recv`` between two spawned local processes at three message sizes
and fits ``latency + bytes / bandwidth`` to each (``CommunicationProfile``): on a CPU a
collective costs around a millisecond, not the catalog default's tens of microseconds.
The same two processes then alternate compute bursts and an all-reduce, as workers
do, and report how many cores they got between them (``concurrent_cores``): on a
machine shared with other tenants two workers may get one core, so every collective
waits for the peer's compute.

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
    StepSeconds,
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
        help="sequences per microbatch (also timed at 4x this, to separate fixed costs; "
        "the real step also at 16x)",
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
        step=measure_step(model, sequence_length, microbatch_size, repeats),
    )


STEP_SHAPES = ((1, 1), (4, 1), (16, 1), (1, 4), (4, 4))
"""(microbatch size in units of ``--microbatch-size``, microbatches) of the timed real
steps: one microbatch from 1x to 16x (plans on a CPU pick up to 16 sequences per
microbatch, and the slope is not quite constant over that range) and four
microbatches at two sizes (separating per-microbatch from per-step seconds)."""


def fit_step(points: list[tuple[int, int, float]], parameters: int) -> StepSeconds:
    """Least-squares line ``per_step + k x (per_microbatch + tokens x per_token)``
    through ``(tokens per microbatch, microbatches k, seconds)`` points, in relative
    error (small and large steps count alike). Noise that would make a term negative
    drops it: the best fit with only non-negative terms (and a positive slope) wins."""
    rows = [((k * tokens, k, 1.0), seconds) for tokens, k, seconds in points]
    best: tuple[float, list[float]] | None = None
    for terms in ((0, 1, 2), (0, 1), (0, 2), (0,)):
        coefficients = _least_squares(
            [([x[i] / y for i in terms], 1.0) for x, y in rows], len(terms)
        )
        if coefficients is None or coefficients[0] <= 0 or min(coefficients) < 0:
            continue
        full = [0.0, 0.0, 0.0]
        for i, value in zip(terms, coefficients, strict=True):
            full[i] = value
        error = sum(
            (sum(f * v for f, v in zip(full, x, strict=True)) / y - 1) ** 2 for x, y in rows
        )
        if best is None or error < best[0] - 1e-15:
            best = (error, full)
    if best is None:  # no positive slope fits: the largest step's average
        tokens, k, seconds = max(points, key=lambda p: p[0] * p[1])
        best = (0.0, [seconds / (tokens * k), 0.0, 0.0])
    per_token, per_microbatch, per_step = best[1]
    return StepSeconds(
        per_token=per_token,
        per_microbatch=per_microbatch,
        per_step=per_step,
        parameters=parameters,
    )


def _least_squares(rows: list[tuple[list[float], float]], n: int) -> list[float] | None:
    """Solution of the normal equations of ``rows`` (features, target), or None when
    they are singular."""
    matrix = [[sum(x[i] * x[j] for x, _ in rows) for j in range(n)] for i in range(n)]
    vector = [sum(x[i] * y for x, y in rows) for i in range(n)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(matrix[r][col]))
        if abs(matrix[pivot][col]) < 1e-300:
            return None
        matrix[col], matrix[pivot] = matrix[pivot], matrix[col]
        vector[col], vector[pivot] = vector[pivot], vector[col]
        for row in range(n):
            if row != col:
                factor = matrix[row][col] / matrix[col][col]
                matrix[row] = [
                    a - factor * b for a, b in zip(matrix[row], matrix[col], strict=True)
                ]
                vector[row] -= factor * vector[col]
    return [vector[i] / matrix[i][i] for i in range(n)]


def measure_step(
    model: ModelArchitecture, sequence_length: int, microbatch_size: int, repeats: int
) -> StepSeconds:
    """The trainer's real step in this process (a one-rank gloo group) at the shapes
    of ``STEP_SHAPES``. The trainers take turns step by step, so a change in the
    machine's load while measuring shifts all shapes alike instead of tilting the fit."""
    import tempfile

    import torch.distributed as dist

    if dist.is_initialized():
        raise UserError("hetmoe profile cannot time a training step inside a running job")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with tempfile.TemporaryDirectory(prefix="hetmoe-profile-step-") as tmp:
            trainers = [
                _trainer(model, sequence_length, size * microbatch_size, count, Path(tmp) / str(i))
                for i, (size, count) in enumerate(STEP_SHAPES)
            ]
            seconds = _interleaved_cpu_seconds([t.train_step for t in trainers], repeats)
            parameters = sum(p.numel() for p in trainers[0].stage.parameters())
    finally:
        dist.destroy_process_group()
    points = [
        (size * microbatch_size * sequence_length, count, timed)
        for (size, count), timed in zip(STEP_SHAPES, seconds, strict=True)
    ]
    return fit_step(points, parameters)


def _interleaved_cpu_seconds(calls: list[Callable[[], None]], repeats: int) -> list[float]:
    """Median CPU seconds of each call, the calls taking turns (see ``_cpu_seconds``)."""
    for _ in range(_WARMUP):
        for call in calls:
            call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for call, seconds in zip(calls, times, strict=True):
            start = time.process_time()
            call()
            seconds.append(time.process_time() - start)
    return [statistics.median(seconds) for seconds in times]


def _trainer(
    model: ModelArchitecture,
    sequence_length: int,
    microbatch_size: int,
    microbatches: int,
    checkpoint_dir: Path,
) -> Any:
    """A one-process ``Trainer`` of the whole model with ``microbatches`` microbatches of
    ``microbatch_size`` sequences (synthetic data, no checkpoints, no metrics server)."""
    from hetmoe_operator.plan import Plan
    from hetmoe_trainer.distributed import build_context, pick_device
    from hetmoe_trainer.loop import Trainer, TrainerOptions

    training = TrainingConfig(
        steps=10**6,
        global_batch_size=microbatch_size * microbatches,
        sequence_length=sequence_length,
    )
    plan = Plan.single_process(model, training, microbatch_size)
    options = TrainerOptions(
        checkpoint_dir=checkpoint_dir, checkpoint_interval=10**9, peak_flops=1.0
    )
    return Trainer(build_context(plan, 0, pick_device(0)), options)


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
    stage_plan = StagePlan.whole_model(model)
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
        latency = results["all_reduce"][0][1]
        cpu, wall, rounds = _co_scheduled(repeats)
        if rank == 0:
            cores = concurrent_cores(cpu, wall, rounds, latency, os.cpu_count() or 1)
            Path(out).write_text(json.dumps({**results, "concurrent_cores": cores}))
    finally:
        dist.destroy_process_group()


_BURST_MATMULS = 40
"""Matmuls (96 x 96) per compute burst of the co-scheduling probe: a few milliseconds,
like one layer's work of a small model between two collectives."""


def _co_scheduled(repeats: int) -> tuple[float, float, int]:
    """(CPU seconds of both ranks' compute, wall seconds, rounds) of rounds of equal
    compute bursts each followed by a small all-reduce, as workers alternate compute
    and collectives. Each collective waits for the peer's burst: if the peer was
    descheduled, the wall time grows while the compute's CPU time does not."""
    import torch
    import torch.distributed as dist

    rounds = 2 * repeats
    weights = torch.randn(96, 96) / 96**0.5
    flag = torch.ones(4)
    dist.barrier()
    cpu = 0.0
    start = time.perf_counter()
    for _ in range(rounds):
        begin = time.process_time()
        a = weights
        for _ in range(_BURST_MATMULS):
            a = torch.tanh(a @ weights)
        cpu += time.process_time() - begin
        dist.all_reduce(flag)
    wall = time.perf_counter() - start
    total = torch.tensor([cpu], dtype=torch.float64)
    dist.all_reduce(total)
    return float(total.item()), wall, rounds


def concurrent_cores(cpu: float, wall: float, rounds: int, latency: float, cores: int) -> float:
    """Cores the probe's processes got between them: their compute's CPU seconds over
    the wall time less the collectives' own latency, at most the machine's cores (and
    at least a sliver, so a broken probe never divides by zero)."""
    busy = max(wall - rounds * latency, 1e-9)
    return min(float(cores), max(cpu / busy, 0.01))


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
        concurrent_cores=results["concurrent_cores"],
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
    step = profile.seconds.step
    if step is not None:
        per_token, fixed = profile.seconds.class_totals(profile.model)
        print(
            f"\nreal step (one process): {step.per_token * 1e6:.3f} us/token "
            f"(classes: {per_token * 1e6:.3f}), {step.per_microbatch * 1e3:.3f} ms/microbatch "
            f"(classes: {fixed * 1e3:.3f}), {step.per_step * 1e3:.3f} ms/step "
            f"(optimizer class: {step.parameters * profile.seconds.optimizer * 1e3:.3f}); "
            "the effective TFLOP/s above are the classes scaled to the real step"
        )
    comm = profile.communication
    if comm is not None:
        print(f"\n{'collective (' + comm.backend + ')':<20} {'latency us':>12} {'GB/s':>10}")
        for name in ("all_reduce", "all_to_all", "send_recv"):
            link = getattr(comm, name)
            print(f"{name:<20} {link.latency_seconds * 1e6:>12.1f} {link.gbps:>10.3f}")
        if comm.concurrent_cores is not None:
            print(
                f"two workers alternating compute and all-reduce got "
                f"{comm.concurrent_cores:.2f} of {profile.cores} cores"
            )
    if args.output:
        args.output.write_text(profile_yaml(profile))
        print(f"wrote {args.output}")
    snippet = shared_throughput(profile, args.processes).to_wire()
    print(f"\n# catalog grade snippet for {args.processes} process(es) on {profile.cores} cores:")
    print(yaml.safe_dump({"measured": snippet}, sort_keys=False), end="")
    return 0
