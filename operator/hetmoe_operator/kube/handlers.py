"""kopf wiring: one daemon per MoEJob running reconcile passes, watches that wake it.

Why a daemon per job instead of on.create/on.update handlers: reconciliation here is
level-based (observe everything, decide, apply), so the trigger only needs to say
"look again". A daemon serialises passes for one job, sleeps exactly as long as the
decision asks (backoff, polling), and is woken at once by pod, node and spec events.
kopf stops it (and drops its finalizer) when the job is deleted; with peering only
the active replica runs daemons, so two replicas never reconcile the same job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import kopf

from hetmoe_operator.api.job import GROUP, PLURAL, VERSION
from hetmoe_operator.desired.names import JOB_LABEL
from hetmoe_operator.kube.reconciler import Reconciler
from hetmoe_operator.kube.state import JobKey, NodeCache, PodIndex, Wakeups

log = logging.getLogger(__name__)


PEER_LIFETIME_SECONDS = 15
"""A standby replica takes over this long after the active one stops renewing."""


@dataclass
class OperatorContext:
    """Shared by every handler through kopf's ``memo``."""

    reconciler: Reconciler
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
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout=delay)
        finally:
            ctx.wakeups.forget(key)
            ctx.reconciler.forget(*key)

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def job_event(
        *, body: Any, namespace: str | None, name: str, memo: Any, **_: Any
    ) -> None:
        # Spec edits (suspend, pools...) bump metadata.generation; our own status
        # patches do not, so they do not cause extra passes.
        status = body.get("status") or {}
        if body["metadata"].get("generation") != status.get("observedGeneration"):
            memo.ctx.wakeups.poke((namespace or "", name))

    @kopf.on.event("", "v1", "pods", registry=registry)
    async def pod_event(
        *, event: Any, body: Any, namespace: str | None, name: str, memo: Any, **_: Any
    ) -> None:
        # Every pod feeds the device-usage index; a worker also wakes its job. Async:
        # a few dict updates are cheaper in the loop than a thread hop per event.
        ctx: OperatorContext = memo.ctx
        if event.get("type") == "DELETED":
            ctx.pods.remove(namespace or "", name)
        else:
            ctx.pods.upsert(body)
        owner = (body["metadata"].get("labels") or {}).get(JOB_LABEL)
        if owner:
            ctx.wakeups.poke((namespace or "", owner))

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

    return registry
