"""kopf wiring: one daemon per MoEJob running reconcile passes, watches that wake it.

Why a daemon per job instead of on.create/on.update handlers: reconciliation here is
level-based (observe everything, decide, apply), so the trigger only needs to say
"look again". A daemon serialises passes for one job, sleeps exactly as long as the
decision asks (backoff, polling), and is woken at once by pod, node and spec events.
With peering only the active replica runs daemons, so two replicas never reconcile
the same job.

No finalizer: kopf puts one on every object with a daemon, so that it can stop the
daemon before the object goes. Here nothing needs to happen before a job goes (its
children carry ownerReferences and the garbage collector removes them; the checkpoint
volume is never ours to delete), and a finalizer would make deleting a job hang while
no operator runs. The daemon stops itself instead: a pass that finds the job gone
returns ``None`` and the job's DELETED event wakes it for that pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import kopf

from hetmoe_operator.api.job import GROUP, PLURAL, VERSION
from hetmoe_operator.desired.names import JOB_LABEL
from hetmoe_operator.kube.reconciler import Reconciler
from hetmoe_operator.kube.state import JobCache, JobKey, NodeCache, PodIndex, Wakeups

log = logging.getLogger(__name__)


PEER_LIFETIME_SECONDS = 15
"""A standby replica takes over this long after the active one stops renewing."""


@dataclass
class OperatorContext:
    """Shared by every handler through kopf's ``memo``."""

    reconciler: Reconciler
    jobs: JobCache
    nodes: NodeCache
    pods: PodIndex
    wakeups: Wakeups
    peering: str | None
    single_namespace: bool
    """Watching one namespace: namespace scanning (a cluster-scoped list) is off."""
    metrics_port: int
    executor: ThreadPoolExecutor
    """Threads for blocking reconcile passes, sized apart from kopf's own pool so a
    slow planner call never starves watch handlers."""


def build_registry() -> kopf.OperatorRegistry:
    """A registry with every handler (no module-level registration side effects)."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # A private registry does not inherit kopf's default login handlers.
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    async def startup(*, settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
        ctx: OperatorContext = memo.ctx
        settings.posting.enabled = False  # the operator posts its own, meaningful events
        settings.execution.max_workers = 32
        settings.watching.server_timeout = 300
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="hetmoe.io")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="hetmoe.io", key="last-handled-configuration"
        )
        settings.persistence.finalizer = "hetmoe.io/operator"
        if ctx.single_namespace:
            # A namespaced Role cannot list namespaces; kopf would retry that for a minute.
            settings.scanning.disabled = True
        if ctx.peering:
            settings.peering.name = ctx.peering
            settings.peering.mandatory = True
            settings.peering.lifetime = PEER_LIFETIME_SECONDS
        # Warm the node cache before any daemon runs, so a restarted operator never
        # mistakes "not seen yet" for "node deleted".
        ctx.nodes.replace_all(await asyncio.to_thread(ctx.reconciler.api.list_nodes))
        ctx.pods.replace_all(await asyncio.to_thread(ctx.reconciler.api.list_active_pods))
        ctx.pods.replace_workers(await asyncio.to_thread(ctx.reconciler.api.list_worker_pods))
        ctx.wakeups.loop = asyncio.get_running_loop()
        ctx.reconciler.metrics.serve(ctx.metrics_port)

    @kopf.daemon(
        GROUP, VERSION, PLURAL, registry=registry, cancellation_timeout=5.0, initial_delay=0
    )
    async def job_daemon(
        *, namespace: str | None, name: str, memo: Any, stopped: Any, **_: Any
    ) -> None:
        ctx: OperatorContext = memo.ctx
        key: JobKey = (namespace or "", name)
        wake = ctx.wakeups.event(key)
        try:
            while not stopped:
                wake.clear()
                delay = await asyncio.get_running_loop().run_in_executor(
                    ctx.executor, ctx.reconciler.reconcile, *key
                )
                if delay is None:  # the job is gone
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout=delay)
        finally:
            ctx.wakeups.forget(key)
            ctx.reconciler.forget(*key)

    _drop_daemon_finalizer(registry)

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def job_event(
        *, event: Any, namespace: str | None, name: str, memo: Any, **_: Any
    ) -> None:
        # Every version feeds the job cache. Spec edits (suspend, pools...) bump
        # metadata.generation and wake the daemon; our own status patches do not, so
        # they cause no extra passes. A deletion wakes it so that it sees the job
        # gone and ends.
        ctx: OperatorContext = memo.ctx
        key = (namespace or "", name)
        raw = event.get("object") or {}
        if event.get("type") == "DELETED":
            ctx.jobs.remove(key)
            ctx.wakeups.poke(key)
            return
        ctx.jobs.put(raw)
        status = raw.get("status") or {}
        if raw.get("metadata", {}).get("generation") != status.get("observedGeneration"):
            ctx.wakeups.poke(key)

    @kopf.on.event("", "v1", "pods", registry=registry)
    async def pod_event(*, event: Any, namespace: str | None, memo: Any, **_: Any) -> None:
        # Every pod feeds the device-usage index and every worker its job's view; a
        # worker also wakes its job. Async: a few dict updates are cheaper in the
        # loop than a thread hop per event.
        ctx: OperatorContext = memo.ctx
        raw = event.get("object") or {}
        if event.get("type") == "DELETED":
            ctx.pods.remove(raw)
        else:
            ctx.pods.upsert(raw)
        owner = (raw.get("metadata", {}).get("labels") or {}).get(JOB_LABEL)
        if owner:
            ctx.wakeups.poke((namespace or "", owner))
        if _frees_devices(event):
            ctx.wakeups.capacity_may_be_back()

    @kopf.on.event("", "v1", "nodes", registry=registry)
    async def node_event(*, event: Any, body: Any, name: str, memo: Any, **_: Any) -> None:
        ctx: OperatorContext = memo.ctx
        if event.get("type") == "DELETED":
            ctx.nodes.remove(name)
            changed = True
        else:
            changed = ctx.nodes.upsert(body)
        if changed:
            for key in ctx.wakeups.jobs_on(name):
                ctx.wakeups.poke(key)
            ctx.wakeups.capacity_may_be_back()

    return registry


def _frees_devices(event: Any) -> bool:
    """Whether a pod event gives capacity back: a pod bound to a node is gone or finished."""
    raw = event.get("object") or {}
    if not (raw.get("spec") or {}).get("nodeName"):
        return False
    phase = (raw.get("status") or {}).get("phase")
    return event.get("type") == "DELETED" or phase in ("Succeeded", "Failed")


def _drop_daemon_finalizer(registry: kopf.OperatorRegistry) -> None:
    """Register the job daemon without kopf's finalizer (see the module docstring).

    ``kopf.daemon`` has no option for it (daemons always ask for a finalizer), so the
    registered handler is replaced by a copy that does not. Objects that still carry
    the finalizer from an older operator get it removed by kopf on their next event.
    """
    spawning = registry._spawning
    handlers = spawning._handlers
    for index, handler in enumerate(handlers):
        if getattr(handler, "requires_finalizer", False):
            handlers[index] = dataclasses.replace(handler, requires_finalizer=False)
