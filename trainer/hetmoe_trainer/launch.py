"""torchrun, but the agent exits with the code that says what went wrong.

torchrun (torch.distributed.run) turns any worker failure into its own exit code 1,
so the pod would hide the trainer's :class:`~hetmoe_operator.plan.WorkerExit` codes
(78 config error, 86 replace this node, 87 rollbacks exhausted, 88 stopped, 89 hung)
from the operator. This wrapper runs torchrun unchanged and, when workers fail, exits with the
most telling of their codes: a hetmoe code if any worker used one, else the first
failure's.

When the agent itself is signalled (a pod asked to stop), torchrun forwards the signal
to its workers, which finish their step and save a checkpoint
(:mod:`hetmoe_trainer.stop`), waits up to ``--shutdown-timeout`` for them, and raises;
the wrapper then exits as a signalled shell command would (128 + signal, 143 for
SIGTERM) with one log line instead of a traceback.

It also keeps the c10d rendezvous store up until every agent has shut down. torchrun's
host agent (``--rdzv-conf is_host=true``) serves the store from its own process and
exits as soon as the exit barrier passes, so the other agents' rendezvous shutdown
found no store: a ``RendezvousConnectionError`` traceback and a ~9 s stall per node.
Here the host wrapper serves the store itself (torch's agent joins it as a client),
every other wrapper reports ``hetmoe/agents-done`` once its agent has returned, and
after a successful run the host waits for those reports, for at most
:data:`AGENTS_DONE_TIMEOUT_S`.

In-place restarts (``--max-restarts`` > 0, from ``elastic.inPlaceRestarts``): torch's
agent restarts the gang after any worker failure. Here it does so only for failures a
restart can cure: an exit that asks the operator for something (config error, replace
the node, rollbacks exhausted) ends the agent at once, so the pod fails and the
operator acts. Before each in-place restart the agent empties the termination log
(it must speak for the next attempt only) and, if one of its own workers failed first,
records why for the progress report (:mod:`hetmoe_trainer.progress`). The wrapper sets
``$HETMOE_LAUNCH_ID`` once, so plan rank 0 can count the attempts.

Usage is torchrun's: ``python -m hetmoe_trainer.launch [torchrun args] -m hetmoe_trainer ...``
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch.distributed.launcher.api as launcher_api
from torch.distributed import TCPStore
from torch.distributed.elastic.agent.server.api import RunResult, WorkerGroup
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint
from torch.distributed.run import get_args_parser, parse_min_max_nnodes, run

from hetmoe_operator.plan import CHECKPOINT_DIR_ENV, WAITING_FOR_PEERS_MARK, WorkerExit
from hetmoe_trainer.progress import LAUNCH_ID_ENV, record_in_place_restart
from hetmoe_trainer.termination import record_termination, take_termination_lines

# Most specific first: a config error explains the others, a node to replace beats
# an exhausted rollback budget.
_PRIORITY = (
    WorkerExit.CONFIG_ERROR,
    WorkerExit.REPLACE_NODE,
    WorkerExit.ROLLBACK_EXHAUSTED,
    WorkerExit.HUNG,
    WorkerExit.STOPPED,
)


NOT_RETRIED_IN_PLACE = frozenset(_PRIORITY) - {WorkerExit.HUNG, WorkerExit.STOPPED}
"""Exits that ask the operator for something. A hang may be cured by a restart; a
worker that exited 88 inside a failed group was stopped by this agent when a sibling
failed (a pod asked to stop ends the agent itself, with a signal)."""


def telling_exit_code(codes: Iterable[int]) -> int:
    """The exit code the agent should report for these worker exit codes."""
    codes = [c for c in codes if c != 0]
    for code in _PRIORITY:
        if code in codes:
            return code
    if not codes:
        return 1
    first = codes[0]
    # A worker killed by a signal has a negative code; shells report 128 + signal.
    return 128 - first if first < 0 else first


# Long enough for a loaded node's agent to shut its rendezvous down, short enough
# that a node killed after the exit barrier never holds the host pod for long.
AGENTS_DONE_TIMEOUT_S = 30.0
AGENTS_DONE_KEY = "hetmoe/agents-done"
# torch's c10d rendezvous backend uses this port when the endpoint names none.
_C10D_DEFAULT_PORT = 29400


@dataclass(frozen=True)
class RendezvousStore:
    """Where the c10d rendezvous store lives, and whether this agent hosts it."""

    host: str
    port: int
    is_host: bool
    nnodes: int


def rendezvous_store(args: argparse.Namespace) -> RendezvousStore | None:
    """The c10d store of a multi-node run whose host is named by ``is_host``, else None.

    Only an explicit ``is_host`` (what the operator passes) is trusted: guessing the
    host from hostnames, as torch does otherwise, could make two wrappers serve it.
    """
    if args.standalone or args.rdzv_backend != "c10d":
        return None
    conf = dict(item.split("=", 1) for item in args.rdzv_conf.split(",") if "=" in item)
    conf = {key.strip(): value.strip() for key, value in conf.items()}
    is_host = conf.get("is_host", "").lower()
    if is_host not in ("true", "false"):
        return None
    nnodes = parse_min_max_nnodes(args.nnodes)[1]
    if nnodes < 2:
        return None
    host, port = parse_rendezvous_endpoint(args.rdzv_endpoint, default_port=_C10D_DEFAULT_PORT)
    return RendezvousStore(host=host, port=port, is_host=is_host == "true", nnodes=nnodes)


def _as_store_client(rdzv_conf: str) -> str:
    """``rdzv_conf`` with ``is_host=false``: torch's agent joins the store we serve."""
    items = [i for i in rdzv_conf.split(",") if i and i.split("=", 1)[0].strip() != "is_host"]
    return ",".join([*items, "is_host=false"])


def _wait_for_agents(store: TCPStore, expected: int, timeout_s: float) -> None:
    """Block until ``expected`` other agents reported done, or ``timeout_s`` passed."""
    deadline = time.monotonic() + timeout_s
    while store.add(AGENTS_DONE_KEY, 0) < expected and time.monotonic() < deadline:
        time.sleep(0.1)


def _report_done(where: RendezvousStore) -> None:
    """Tell the host wrapper this agent no longer needs the store; best effort."""
    try:
        client = TCPStore(where.host, where.port, is_master=False, timeout=timedelta(seconds=2))
        client.add(AGENTS_DONE_KEY, 1)
    except (RuntimeError, ValueError, TimeoutError):
        pass  # the host is gone already: nothing is waiting for this report


def _say_who_died(failures: Iterable[ProcessFailure]) -> None:
    """A worker killed outright (a signal, the OOM killer, ``os._exit``) leaves no line
    in the termination log, while the workers that fell with it leave theirs, marked as
    waiting for others; so the agent says it for each such worker, and the operator
    names this pod. A worker that exited 1 (an exception) or with a hetmoe code spoke
    for itself; one ended by SIGTERM is a sibling the agent stopped."""
    for failure in failures:
        code = failure.exitcode
        if code in (1, -signal.SIGTERM) or code in _PRIORITY:
            continue
        how = f"exited with code {code}"
        if code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        record_termination(f"local rank {failure.local_rank} {how}")


class _InPlaceRestartingAgent(LocalElasticAgent):
    """torch's agent, restarting its workers in place only when that can help."""

    def _initialize_workers(self, worker_group: WorkerGroup) -> None:
        # Workers stopped for a restart (theirs or a peer's) may have written why they
        # stopped; the next attempt's log must speak for itself.
        take_termination_lines()
        super()._initialize_workers(worker_group)

    def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
        result = super()._monitor_workers(worker_group)
        if not result.is_failed() or self._remaining_restarts <= 0:
            return result
        failures = sorted(result.failures.values(), key=lambda f: f.timestamp)
        if any(f.exitcode in NOT_RETRIED_IN_PLACE for f in failures):
            self._remaining_restarts = 0  # the agent ends and the pod fails with the code
            return result
        _say_who_died(failures)
        lines = take_termination_lines()
        own = [line for line in lines if WAITING_FOR_PEERS_MARK not in line]
        checkpoint_dir = os.environ.get(CHECKPOINT_DIR_ENV)
        if checkpoint_dir and own:  # a worker of this pod failed first: say why
            seat = f"pool {os.environ.get('HETMOE_POOL', '?')} node slot "
            seat += os.environ.get("HETMOE_NODE_SLOT", "?")
            record_in_place_restart(Path(checkpoint_dir), seat, own)
        allowed = worker_group.spec.max_restarts
        why = "; ".join(lines) or f"exit codes {[f.exitcode for f in failures]}"
        print(
            f"hetmoe_trainer.launch: workers failed ({why}); in-place restart "
            f"{allowed - self._remaining_restarts + 1} of {allowed}",
            file=sys.stderr,
        )
        return result


def _run(args: argparse.Namespace) -> int:
    try:
        # torch's launch_agent builds its agent from this module attribute, so it is
        # swapped for the length of the run (there is no parameter for it).
        original = launcher_api.LocalElasticAgent
        launcher_api.LocalElasticAgent = _InPlaceRestartingAgent  # type: ignore[misc]
        try:
            run(args)
        finally:
            launcher_api.LocalElasticAgent = original  # type: ignore[misc]
    except ChildFailedError as error:
        failures = sorted(error.failures.values(), key=lambda f: f.timestamp)
        _say_who_died(failures)
        return telling_exit_code(f.exitcode for f in failures)
    except SignalException as stop:
        print(
            f"hetmoe_trainer.launch: {stop.sigval.name} received; the workers were asked "
            "to finish their step, save a checkpoint and stop",
            file=sys.stderr,
        )
        return 128 + int(stop.sigval)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run torchrun with ``argv``; map worker failures to one telling exit code."""
    args = get_args_parser().parse_args(argv)
    os.environ[LAUNCH_ID_ENV] = uuid.uuid4().hex  # inherited by every attempt's workers
    where = rendezvous_store(args)
    if where is None:
        return _run(args)
    if not where.is_host:
        try:
            return _run(args)
        finally:
            _report_done(where)
    # Served from this process, so it lives until the other agents are done with it.
    store = TCPStore(
        where.host, where.port, is_master=True, multi_tenant=True, wait_for_workers=False
    )
    args.rdzv_conf = _as_store_client(args.rdzv_conf)
    code = _run(args)
    # Success means every agent passed torch's exit barrier, so their reports are
    # seconds away. After a failure the others may still be training: report the
    # code now rather than up to the timeout late; the operator tears them down.
    if code == 0:
        _wait_for_agents(store, where.nnodes - 1, AGENTS_DONE_TIMEOUT_S)
    return code


if __name__ == "__main__":
    sys.exit(main())
