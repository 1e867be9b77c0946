"""Reading a job's world and applying a decision, with a bounded number of calls.

Idempotent by construction: children have deterministic names, a create answered
409 means "already done", a delete answered 404 means "already gone", and the
status patch carries the resourceVersion it was computed from so two operators (or
a stale pass) can never both write it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

from kubernetes.client import ApiClient, CoreV1Api, CustomObjectsApi, V1DeleteOptions
from kubernetes.client.exceptions import ApiException

from hetmoe_operator.api.job import GROUP, PLURAL, VERSION
from hetmoe_operator.desired.children import POD_GROUP_API
from hetmoe_operator.desired.names import ROLE_LABEL, plan_config_map_name
from hetmoe_operator.kube.metrics import OperatorMetrics
from hetmoe_operator.reconcile.conditions import rfc3339
from hetmoe_operator.reconcile.decide import Decision, Delete

log = logging.getLogger(__name__)
T = TypeVar("T")


class Conflict(Exception):
    """The job changed since it was read; the pass is retried."""


class KindNotInstalled(Exception):
    """A child's kind is unknown to the API server (its CRD is not installed)."""


@dataclass(frozen=True)
class ApplyResult:
    """What happened; ``complete`` is False when the call budget ran out."""

    calls: int
    complete: bool
    job: dict[str, Any] | None = None
    """The job as the status patch returned it (None if status was not written)."""


class KubeApi:
    """Thin, counted wrapper over the calls the operator makes (raw JSON, no models:
    parsing kubernetes-client models costs more than the reconcile itself)."""

    def __init__(self, client: ApiClient, metrics: OperatorMetrics) -> None:
        # Typed as Any on purpose: bodies are plain dicts and answers raw JSON
        # (``_preload_content=False``), which the client's stubs do not describe.
        self.core: Any = CoreV1Api(client)
        self.custom: Any = CustomObjectsApi(client)
        self.metrics = metrics

    def call(
        self, verb: str, resource: str, fn: Callable[[], T], *, expected: tuple[int, ...] = ()
    ) -> T:
        """One counted request; its answer is read in full before returning.

        ``expected`` statuses are answers the caller acts on as normal outcomes (404 "not
        made yet", 409 "already exists" on idempotent creates); they are not counted as
        API errors, so the error metric only moves when something is really wrong.

        With ``_preload_content=False`` an answer nobody reads (creates, deletes,
        events) keeps its connection out of the pool, so the next request opens a new
        one: a TLS handshake each time, which on a loaded host cost the operator about
        a tenth of its request time and the API server CPU.
        """
        self.metrics.api_requests.labels(verb, resource).inc()
        try:
            response = fn()
        except ApiException as error:
            if error.status not in expected:
                self.metrics.api_errors.labels(verb, resource, str(error.status)).inc()
            raise
        getattr(response, "data", None)  # reads and caches the body, releasing the connection
        return response

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            response = self.call(
                "get",
                "moejobs",
                lambda: self.custom.get_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, name, _preload_content=False
                ),
                expected=(404,),
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return dict(json.loads(response.data))

    def list_active_pods(self) -> list[dict[str, Any]]:
        """Every non-terminated pod (device usage and pending workers for discovery)."""
        response = self.call(
            "list",
            "pods",
            lambda: self.core.list_pod_for_all_namespaces(
                field_selector="status.phase!=Succeeded,status.phase!=Failed",
                _preload_content=False,
            ),
        )
        return list(json.loads(response.data)["items"])

    def list_worker_pods(self) -> list[dict[str, Any]]:
        """Every hetmoe worker pod in any phase (exit codes of finished ones matter)."""
        response = self.call(
            "list",
            "pods",
            lambda: self.core.list_pod_for_all_namespaces(
                label_selector=f"{ROLE_LABEL}=worker", _preload_content=False
            ),
        )
        return list(json.loads(response.data)["items"])

    def list_nodes(self) -> list[dict[str, Any]]:
        response = self.call("list", "nodes", lambda: self.core.list_node(_preload_content=False))
        return list(json.loads(response.data)["items"])

    def get_plan_config_map(self, namespace: str, job: str) -> dict[str, Any] | None:
        try:
            response = self.call(
                "get",
                "configmaps",
                lambda: self.core.read_namespaced_config_map(
                    plan_config_map_name(job), namespace, _preload_content=False
                ),
                expected=(404,),
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return dict(json.loads(response.data))


class Applier:
    """Executes a Decision: creates, then the status patch, then deletes and events.

    Pods of one generation are created concurrently, and deleted concurrently (they
    are independent and the latency of a restart is dominated by these round trips);
    the three steps themselves run in order so the contract of ``reconcile.decide``
    holds.
    """

    def __init__(self, api: KubeApi, max_calls: int, executor: Executor) -> None:
        self.api = api
        self.max_calls = max_calls
        self.executor = executor

    def apply(self, job: Mapping[str, Any], decision: Decision) -> ApplyResult:
        meta = job["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        creates = list(decision.creates)
        budgeted = creates[: self.max_calls]
        calls = len(budgeted)
        for manifest in (m for m in budgeted if m["kind"] != "Pod"):
            self._create(namespace, manifest)
        pods = [m for m in budgeted if m["kind"] == "Pod"]
        list(self.executor.map(lambda m: self._create(namespace, m), pods))
        if len(budgeted) < len(creates):
            # Status is not written: the next pass adopts the half-created generation.
            return ApplyResult(calls, False)
        patch = status_patch(job.get("status") or {}, decision.status.to_wire())
        patched = None
        if patch:
            patched = self._patch_status(namespace, name, meta["resourceVersion"], patch)
            calls += 1
        deletes = list(decision.deletes[: max(0, self.max_calls - calls)])
        list(self.executor.map(lambda d: self._delete(namespace, d), deletes))
        calls += len(deletes)
        if len(deletes) < len(decision.deletes):
            return ApplyResult(calls, False, patched)
        for event in decision.events:
            if calls >= self.max_calls:
                break
            self._event(job, event.type, event.reason, event.message)
            calls += 1
        return ApplyResult(calls, True, patched)

    def _create(self, namespace: str, manifest: dict[str, Any]) -> None:
        kind = manifest["kind"]
        core = self.api.core
        creators: dict[str, Callable[[], Any]] = {
            "Pod": lambda: core.create_namespaced_pod(namespace, manifest, _preload_content=False),
            "Service": lambda: core.create_namespaced_service(
                namespace, manifest, _preload_content=False
            ),
            "ConfigMap": lambda: core.create_namespaced_config_map(
                namespace, manifest, _preload_content=False
            ),
            "PodGroup": lambda: self.api.custom.create_namespaced_custom_object(
                *POD_GROUP_API.split("/"), namespace, "podgroups", manifest, _preload_content=False
            ),
        }
        try:
            self.api.call("create", kind.lower() + "s", creators[kind], expected=(409,))
        except ApiException as error:
            if error.status == 404 and kind == "PodGroup":
                raise KindNotInstalled(
                    "spec.scheduling.gang is coscheduling but the API server does not know "
                    f"podgroups.{POD_GROUP_API.split('/')[0]} (the scheduler-plugins PodGroup "
                    "CRD is not installed): install scheduler-plugins' coscheduling, or set "
                    "spec.scheduling.gang to none"
                ) from None
            if error.status != 409:
                raise
            if kind == "ConfigMap":  # the plan changed: replace it
                self.api.call(
                    "replace",
                    "configmaps",
                    lambda: core.replace_namespaced_config_map(
                        manifest["metadata"]["name"], namespace, manifest, _preload_content=False
                    ),
                )

    def _patch_status(
        self, namespace: str, name: str, resource_version: str, patch: dict[str, Any]
    ) -> dict[str, Any]:
        body = {"metadata": {"resourceVersion": resource_version}, "status": patch}
        try:
            response = self.api.call(
                "patch",
                "moejobs/status",
                lambda: self.api.custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, namespace, PLURAL, name, body, _preload_content=False
                ),
                expected=(404, 409),
            )
        except ApiException as error:
            if error.status in (404, 409):
                raise Conflict(f"{namespace}/{name}: {error.reason}") from None
            raise
        return dict(json.loads(response.data))

    def _delete(self, namespace: str, delete: Delete) -> None:
        """Delete a pod or a PodGroup; one already gone is what we wanted."""
        call: Callable[[], Any]
        if delete.kind == "PodGroup":
            group, version = POD_GROUP_API.split("/")
            call = partial(
                self.api.custom.delete_namespaced_custom_object,
                group,
                version,
                namespace,
                "podgroups",
                delete.name,
                _preload_content=False,
            )
        else:
            grace = delete.grace_seconds
            options = V1DeleteOptions(grace_period_seconds=grace) if grace is not None else None
            call = partial(
                self.api.core.delete_namespaced_pod,
                delete.name,
                namespace,
                body=options,
                _preload_content=False,
            )
        try:
            self.api.call("delete", delete.kind.lower() + "s", call, expected=(404,))
        except ApiException as error:
            if error.status != 404:
                raise

    def _event(self, job: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        meta = job["metadata"]
        now = rfc3339(datetime.now(UTC))
        body = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "MoEJob",
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "source": {"component": "hetmoe-operator"},
            "reportingComponent": "hetmoe.io/operator",
        }
        try:
            self.api.call(
                "create",
                "events",
                lambda: self.api.core.create_namespaced_event(
                    meta["namespace"], body, _preload_content=False
                ),
            )
        except ApiException as error:  # events are best effort
            log.warning("event %s on %s not recorded: %s", reason, meta["name"], error.reason)


def status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """JSON merge patch turning ``old`` status into ``new`` (removed keys -> null)."""
    patch: dict[str, Any] = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in old if k not in new})
    return patch
