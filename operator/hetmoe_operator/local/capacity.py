"""Can this machine run the plan? Checked before any process starts.

The planner checks the plan against the *simulated* devices of the local cluster
file; here it is checked against the real machine, so that an impossible local run
fails with one message instead of thrashing or being OOM-killed halfway.
"""

from __future__ import annotations

import os
from pathlib import Path

from hetmoe_operator.errors import UserError
from hetmoe_operator.plan import Plan

RANKS_PER_CPU = 4
"""Oversubscription limit: past a few CPU-bound processes per core, steps crawl and
the gloo rendezvous starts timing out, so such a local run is refused."""
PROCESS_OVERHEAD_GIB = 0.6
"""Resident memory of one trainer process before the model (interpreter, torch, gloo);
torchrun's own agent per pod is counted with it."""
GIB = float(1 << 30)


def available_memory_gib(meminfo: Path = Path("/proc/meminfo")) -> float | None:
    """MemAvailable of this machine, or None where /proc/meminfo does not exist."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        return None
    return None


def needed_memory_gib(plan: Plan) -> float:
    """Host memory the plan's processes need: model state and activations per rank.

    Uses the planner's per-(pool, stage) estimate without its accelerator runtime
    overhead (CUDA context, NCCL buffers), which a CPU process does not have, and
    adds the measured footprint of a bare trainer process instead.
    """
    estimates = {(m.pool, m.stage): m for m in (plan.prediction.memory if plan.prediction else [])}
    total = 0.0
    for rank in plan.ranks:
        estimate = estimates.get((rank.pool, rank.stage))
        if estimate is not None:
            total += (
                estimate.weights_gib
                + estimate.gradients_gib
                + estimate.optimizer_gib
                + estimate.activations_gib
            )
        total += PROCESS_OVERHEAD_GIB
    return total


def check_fits_machine(
    plan: Plan, *, cpus: int | None = None, memory_gib: float | None = None
) -> None:
    """Raise a UserError saying what to change when this machine cannot run ``plan``."""
    cpus = cpus or os.cpu_count() or 1
    limit = RANKS_PER_CPU * cpus
    if plan.world_size > limit:
        raise UserError(
            f"the plan needs {plan.world_size} worker processes but this machine "
            f"({cpus} CPUs) runs at most {limit} ({RANKS_PER_CPU} per CPU) in local mode; "
            "use a cluster file with fewer pools, nodes or devices per node (--cluster)"
        )
    available = memory_gib if memory_gib is not None else available_memory_gib()
    needed = needed_memory_gib(plan)
    if available is not None and needed > available:
        raise UserError(
            f"the model ({plan.model.total_params / 1e9:.2f} B parameters) needs about "
            f"{needed:.1f} GiB of host memory for "
            f"{plan.world_size} worker processes, but only {available:.1f} GiB is available; "
            "choose a smaller model (e.g. model.preset: tiny) or run it on a cluster"
        )
