"""Expert-parallel dispatch on 2 and 4 gloo processes matches one process hosting all experts.

Each worker runs one MoE decoder layer on its own batch twice: expert-parallel
(experts spread as in the scenario) and single-process (all experts local, no
group). Outputs, input gradients and dense gradients must agree per rank; routed-
expert gradients must agree once summed over the group (a replica only sees the
share of the tokens it was sent).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hetmoe_operator.api.model import PRESETS
from hetmoe_operator.api.training import TrainingConfig
from hetmoe_operator.plan import StagePlan
from hetmoe_trainer.model import ExpertParallel, Stage, build_stage
from hetmoe_trainer.model.dispatch import TokenDispatcher

LAYER = 2
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(stage: Stage, x: torch.Tensor, probe: torch.Tensor) -> tuple[torch.Tensor, ...]:
    stage.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = stage(x, step=1)
    (out * probe).sum().backward()
    assert x.grad is not None
    return out.detach(), x.grad


def _per_expert_grads(stage: Stage) -> dict[int, list[torch.Tensor]]:
    """Hosted expert id -> its gradient slices (gate+up, down) of layer LAYER."""
    grads: dict[int, list[torch.Tensor]] = {}
    for expert, name, param, index in stage.expert_slices():
        if name.startswith(f"layers.{LAYER}."):
            grads.setdefault(expert, []).append(param.grad[index])
    return grads


def _expert_grads(stage: Stage, group: dist.ProcessGroup) -> torch.Tensor:
    """Every expert's gradients flattened, zeros where not hosted, summed over the group."""
    arch = stage.arch
    grads = _per_expert_grads(stage)
    flat = []
    for e in range(arch.num_experts):
        if e in grads:
            flat.append(torch.cat([g.flatten() for g in grads[e]]))
        else:
            flat.append(torch.zeros(arch.expert_params))
    summed = torch.cat(flat)
    dist.all_reduce(summed, group=group)
    return summed


def _check_scenario(rank: int, rank_experts: list[list[int]]) -> None:
    arch = PRESETS["tiny"]
    training = TrainingConfig(
        steps=2, global_batch_size=2, sequence_length=8, seed=5, routing_warmup_steps=4
    )
    plan = StagePlan(
        index=0, layer_start=LAYER, layer_end=LAYER + 1, has_embedding=False, has_head=False
    )
    group = dist.new_group(list(range(len(rank_experts))))
    parallel = build_stage(
        arch, plan, training, ExpertParallel(group, rank_experts, rank), device="cpu"
    )
    single = build_stage(
        arch, plan, training, ExpertParallel(None, [list(range(arch.num_experts))], 0), device="cpu"
    )
    gen = torch.Generator().manual_seed(100 + rank)
    batch = 1 + rank % 2  # uneven token counts across ranks
    x = torch.randn(batch, 8, arch.hidden_size, generator=gen)
    probe = torch.randn(batch, 8, arch.hidden_size, generator=gen)

    out_p, xgrad_p = _run(parallel, x, probe)
    out_s, xgrad_s = _run(single, x, probe)
    # Forward: count exchange, dispatch, combine; backward: the two transposes. Each
    # is timed on the group's own timer; the single process exchanges nothing.
    timer = parallel.moe_layers()[LAYER].dispatcher.ep.timer
    assert timer.calls == 5 and timer.seconds > 0
    assert single.moe_layers()[LAYER].dispatcher.ep.timer.calls == 0
    torch.testing.assert_close(out_p, out_s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xgrad_p, xgrad_s, rtol=1e-5, atol=1e-6)
    single_params = dict(single.named_parameters())
    expert = {id(p) for p in parallel.expert_parameters()}
    for name, param in parallel.named_parameters():
        if id(param) not in expert:
            torch.testing.assert_close(param.grad, single_params[name].grad, msg=name)
    torch.testing.assert_close(
        _expert_grads(parallel, group),
        _expert_grads(single, group),
        rtol=1e-5,
        atol=1e-6,
    )
    load = parallel.pop_expert_load()[LAYER]
    torch.testing.assert_close(load, single.pop_expert_load()[LAYER])

    # Replicas really share the work: every host of an expert that had at least as
    # many slots as hosts from some rank computed a non-zero gradient for it.
    moe = parallel.moe_layers()[LAYER]
    counts = torch.stack([load])
    dist.all_reduce(counts, group=group)
    grads = _per_expert_grads(parallel)
    for e in moe.experts.expert_ids:
        hosts = [i for i, ex in enumerate(rank_experts) if e in ex]
        if len(hosts) > 1 and counts[0, e] >= 2 * len(rank_experts) * len(hosts):
            assert grads[e][1].abs().sum() > 0, f"replica of {e} idle"


def _worker(rank: int, world: int, port: int, scenarios: list[list[list[int]]]) -> None:
    with gloo_group(rank, world, port):
        for rank_experts in scenarios:
            _check_scenario(rank, rank_experts)


@contextmanager
def gloo_group(rank: int, world: int, port: int) -> Iterator[None]:
    """The default process group of one spawned worker (gloo, single-threaded compute)."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=TIMEOUT_S),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def spawn(worker: Callable[..., None], world: int, *args: object) -> None:
    """Run ``worker(rank, world, port, *args)`` in ``world`` processes; fail on error or timeout."""
    # A fork server that imported torch once forks the workers: no per-worker torch
    # import (seconds each on a busy 2-core machine) and no fork of a process that
    # already started OpenMP threads.
    mp.get_context("forkserver").set_forkserver_preload(
        ["torch", "torch.distributed", "hetmoe_operator.plan", "hetmoe_trainer.model"]
    )
    context = mp.start_processes(
        worker,
        args=(world, _free_port(), *args),
        nprocs=world,
        join=False,
        start_method="forkserver",
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world}-process test timed out")


def test_two_processes_even_and_uneven_split():
    spawn(_worker, 2, [[[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 1, 2, 3, 4], [5, 6, 7]]])


def test_four_processes_with_a_replicated_hot_expert():
    # Expert 0 lives on members 0 and 3; member 3 hosts nothing else.
    spawn(_worker, 4, [[[0, 1], [2, 3, 4], [5, 6, 7], [0]], [[0, 1, 2], [3], [4, 5, 6, 7], [0, 3]]])


def test_expert_parallel_rejects_unhosted_experts():
    with pytest.raises(ValueError, match=r"experts \[7\] are hosted by no member"):
        TokenDispatcher(ExpertParallel(None, [[0, 1, 2], [3, 4, 5, 6]], 0), 8)
    with pytest.raises(ValueError, match="do not exist"):
        TokenDispatcher(ExpertParallel(None, [list(range(9))], 0), 8)
    with pytest.raises(ValueError, match="my_index"):
        ExpertParallel(None, [[0]], 1)
    ep = ExpertParallel(None, [[3, 0, 0], [0, 5]], 1)
    assert ep.rank_experts == ((0, 3), (0, 5)) and ep.local_experts == (0, 5)
    assert ep.hosts(0) == (0, 1) and ep.hosts(5) == (1,) and ep.hosts(9) == ()
