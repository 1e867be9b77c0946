"""Worker processes and the Pods that run them: one Pod per (pool, node slot).

Why bare Pods and not one Indexed Job per pool: a hetmoe generation is all-or-nothing
(torchrun rendezvous spans every pool), so the operator must stop *every* worker when
one fails and start a fresh generation, possibly with a different plan and pod count
per pool. Job controllers would add their own retry semantics (backoffLimit, pod
replacement inside the generation) that fight that, a second controller's latency
on every relaunch, and an extra object kind to garbage-collect. Pods with
deterministic names keep the whole lifecycle in one reconcile loop, and each pod
maps 1:1 to a plan node slot, so device requests can differ per grade.

Every argument is an element of an argv list (never a shell string), so nothing a
user writes in the spec can be interpreted by a shell.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hetmoe_operator.api.job import CheckpointVolume, MoEJobSpec
from hetmoe_operator.api.operator_config import Toleration, WorkerPorts
from hetmoe_operator.desired.names import (
    GENERATION_LABEL,
    JOB_LABEL,
    NODE_SLOT_LABEL,
    PLAN_GENERATION_LABEL,
    PLAN_KEY,
    RANK0_LABEL,
    ROLE_LABEL,
    WORKER_POOL_LABEL,
    JobRef,
    base_labels,
    plan_config_map_name,
    pod_group_name,
    pod_hostname,
    pod_name,
    service_name,
)
from hetmoe_operator.plan import CHECKPOINT_DIR_ENV, Plan

PLAN_DIR = "/etc/hetmoe"
PLAN_PATH = f"{PLAN_DIR}/{PLAN_KEY}"
CHECKPOINT_DIR = "/checkpoints"
CONTAINER_NAME = "trainer"
AGENT_SHUTDOWN_MARGIN_SECONDS = 5
"""How much sooner than the kubelet the torchrun agent gives up on its workers.

On SIGTERM the agent forwards the signal to its trainers and SIGKILLs them after
``--shutdown-timeout`` (torch's default is 30 s, whatever the pod's grace period). Set
just under the pod's grace, the trainers get nearly all of it to finish their step and
save a checkpoint, and the agent still has a moment to report their exit codes before
the kubelet kills the whole container."""


@dataclass(frozen=True)
class WorkerLaunch:
    """One node's worker: a torchrun agent (``hetmoe_trainer.launch``) running ``nproc`` trainers.

    Executor-agnostic: pods and local processes start exactly this argv and env.
    """

    pool: str
    grade: str
    node_slot: int
    node_index: int
    """Position in ``Plan.nodes()``; node 0 hosts plan rank 0 and the rendezvous store."""
    nproc: int
    argv: tuple[str, ...]
    env: Mapping[str, str]


IN_PLACE_KEEP_ALIVE_SECONDS = 2
"""Rendezvous heartbeat with in-place restarts: a lost pod is dropped after 3 missed."""


def agent_shutdown_timeout(stop_grace_seconds: int) -> int:
    """torchrun's ``--shutdown-timeout`` for a pod with this grace period (see the margin)."""
    return max(1, stop_grace_seconds - AGENT_SHUTDOWN_MARGIN_SECONDS)


def rendezvous_host(job: JobRef, generation: int) -> str:
    """DNS name of node 0's pod through the headless Service."""
    return f"{pod_hostname(generation, 0)}.{service_name(job.name)}.{job.namespace}.svc"


def worker_launches(
    plan: Plan,
    *,
    job_name: str,
    generation: int,
    plan_generation: int,
    rendezvous_endpoint: str,
    metrics_port: int,
    stop_grace_seconds: int,
    plan_path: str = PLAN_PATH,
    checkpoint_dir: str = CHECKPOINT_DIR,
    checkpoint_interval: int = 100,
    keep_checkpoints: int = 3,
    hang_timeout_seconds: int = 0,
    in_place_restarts: int = 0,
    grade_peak_tflops: Mapping[str, float] | None = None,
) -> list[WorkerLaunch]:
    """argv and env of every node's torchrun agent, in plan node order.

    Identity comes from ``HETMOE_POOL``/``HETMOE_NODE_SLOT`` plus torchrun's
    ``LOCAL_RANK``; the trainer looks up its plan rank (stage, layers, experts) with
    ``Plan.rank_at``. ``--rdzv-conf is_host`` tells node 0 to host the store, which
    avoids torchrun guessing from hostnames. ``stop_grace_seconds`` is the pod's
    termination grace period, which bounds ``--shutdown-timeout``. ``in_place_restarts``
    is torchrun's ``--max-restarts`` (``hetmoe_trainer.launch`` says which failures it
    retries). ``grade_peak_tflops`` (the catalog's datasheet peaks) becomes the trainer's
    MFU denominator on GPUs, for the grades the plan uses.
    """
    nodes = plan.nodes()
    grades = {(r.pool, r.node_slot): r.grade for r in plan.ranks}
    # A pod lost mid-round stays a member of the finished rendezvous round until its
    # heartbeats lapse (torch's default 5 s x 3), and the agents that restart in place
    # cannot start the next round before; faster heartbeats let a replacement in sooner.
    keep_alive = (
        f",keep_alive_interval={IN_PLACE_KEEP_ALIVE_SECONDS},keep_alive_max_attempt=3"
        if in_place_restarts
        else ""
    )
    peaks = ",".join(
        f"{grade}={tflops:g}"
        for grade, tflops in sorted((grade_peak_tflops or {}).items())
        if grade in grades.values()
    )
    launches = []
    for index, (pool, slot, nproc) in enumerate(nodes):
        argv = (
            # torchrun through our wrapper, which keeps the trainer's exit codes.
            "python",
            "-m",
            "hetmoe_trainer.launch",
            f"--nnodes={len(nodes)}",
            f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rendezvous_endpoint}",
            f"--rdzv-id={job_name}-g{generation}",
            f"--rdzv-conf=is_host={'true' if index == 0 else 'false'}{keep_alive}",
            f"--max-restarts={in_place_restarts}",
            f"--shutdown-timeout={agent_shutdown_timeout(stop_grace_seconds)}",
            "-m",
            "hetmoe_trainer",
            "--plan",
            plan_path,
            "--checkpoint-dir",
            checkpoint_dir,
            "--checkpoint-interval",
            str(checkpoint_interval),
            "--keep-checkpoints",
            str(keep_checkpoints),
            "--metrics-port",
            str(metrics_port),
            "--hang-timeout",
            str(hang_timeout_seconds),
            *(("--grade-peak-tflops", peaks) if peaks else ()),
        )
        env = {
            "HETMOE_JOB": job_name,
            "HETMOE_POOL": pool,
            "HETMOE_NODE_SLOT": str(slot),
            "HETMOE_NODE_INDEX": str(index),
            "HETMOE_GENERATION": str(generation),
            "HETMOE_PLAN_GENERATION": str(plan_generation),
            "HETMOE_WORLD_SIZE": str(plan.world_size),
            "HETMOE_NNODES": str(len(nodes)),
            "HETMOE_RDZV_ENDPOINT": rendezvous_endpoint,
            "HETMOE_PLAN": plan_path,
            CHECKPOINT_DIR_ENV: checkpoint_dir,
            "HETMOE_METRICS_PORT": str(metrics_port),
            # torchrun + gloo elastic restarts fail intermittently without it.
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        }
        launches.append(
            WorkerLaunch(
                pool=pool,
                grade=grades[(pool, slot)],
                node_slot=slot,
                node_index=index,
                nproc=nproc,
                argv=argv,
                env=env,
            )
        )
    return launches


@dataclass(frozen=True)
class PodContext:
    """Everything besides the plan that shapes a worker pod."""

    job: JobRef
    spec: MoEJobSpec
    generation: int
    plan_generation: int
    ports: WorkerPorts
    resource_names: Mapping[str, str]
    """Grade name -> extended resource counting its devices (from the catalog)."""
    pool_label: str
    tolerations: Sequence[Toleration]
    excluded_nodes: Sequence[str] = ()
    peak_tflops: Mapping[str, float] = field(default_factory=dict)
    """Grade name -> datasheet bf16 peak (from the catalog), for the trainer's MFU."""


def worker_pods(plan: Plan, ctx: PodContext) -> list[dict[str, Any]]:
    """Every worker pod of one generation, in plan node order."""
    endpoint = f"{rendezvous_host(ctx.job, ctx.generation)}:{ctx.ports.rendezvous}"
    launches = worker_launches(
        plan,
        job_name=ctx.job.name,
        generation=ctx.generation,
        plan_generation=ctx.plan_generation,
        rendezvous_endpoint=endpoint,
        metrics_port=ctx.ports.metrics,
        stop_grace_seconds=ctx.spec.checkpoint.stop_grace_period_seconds,
        checkpoint_interval=ctx.spec.checkpoint.interval_steps,
        keep_checkpoints=ctx.spec.checkpoint.keep,
        hang_timeout_seconds=ctx.spec.elastic.hang_timeout_seconds,
        in_place_restarts=ctx.spec.elastic.in_place_restarts,
        grade_peak_tflops=ctx.peak_tflops,
    )
    return [_pod(launch, ctx, len(launches)) for launch in launches]


def _pod(launch: WorkerLaunch, ctx: PodContext, total: int) -> dict[str, Any]:
    job, spec = ctx.job, ctx.spec
    labels = {
        **base_labels(job.name),
        ROLE_LABEL: "worker",
        GENERATION_LABEL: str(ctx.generation),
        PLAN_GENERATION_LABEL: str(ctx.plan_generation),
        WORKER_POOL_LABEL: launch.pool,
        NODE_SLOT_LABEL: str(launch.node_slot),
        **_gang_labels(spec, job.name, ctx.generation),
    }
    if launch.node_index == 0:
        labels[RANK0_LABEL] = "true"
    annotations = {}
    if spec.scheduling.gang == "kueue":
        annotations["kueue.x-k8s.io/pod-group-total-count"] = str(total)
    resource = ctx.resource_names[launch.grade]
    requests: dict[str, str] = {resource: str(launch.nproc)}
    if spec.resources.cpu:
        requests["cpu"] = spec.resources.cpu
    if spec.resources.memory:
        requests["memory"] = spec.resources.memory
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "hostname": pod_hostname(ctx.generation, launch.node_index),
        "subdomain": job.name,
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": spec.checkpoint.stop_grace_period_seconds,
        "affinity": _affinity(launch.pool, ctx),
        "tolerations": [t.manifest() for t in ctx.tolerations],
        "containers": [
            {
                "name": CONTAINER_NAME,
                "image": spec.image,
                "command": [launch.argv[0]],
                "args": list(launch.argv[1:]),
                "env": [{"name": k, "value": v} for k, v in launch.env.items()],
                "ports": [
                    {"name": "rendezvous", "containerPort": ctx.ports.rendezvous},
                    # The trainer serves rank k of the node on metrics + k; named ports
                    # let a PodMonitor scrape every rank, not only local rank 0.
                    {"name": "metrics", "containerPort": ctx.ports.metrics},
                    *(
                        {"name": f"metrics-{k}", "containerPort": ctx.ports.metrics + k}
                        for k in range(1, launch.nproc)
                    ),
                ],
                "resources": {"requests": requests, "limits": {resource: str(launch.nproc)}},
                "volumeMounts": [
                    {"name": "plan", "mountPath": PLAN_DIR, "readOnly": True},
                    {"name": "checkpoints", "mountPath": CHECKPOINT_DIR},
                ],
            }
        ],
        "volumes": [
            {
                "name": "plan",
                "configMap": {
                    "name": plan_config_map_name(job.name),
                    "items": [{"key": PLAN_KEY, "path": PLAN_KEY}],
                },
            },
            {"name": "checkpoints", **_checkpoint_volume(spec.checkpoint.volume)},
        ],
    }
    if spec.scheduling.priority_class_name:
        pod_spec["priorityClassName"] = spec.scheduling.priority_class_name
    metadata: dict[str, Any] = {
        "name": pod_name(job.name, ctx.generation, launch.pool, launch.node_slot),
        "namespace": job.namespace,
        "labels": labels,
        "ownerReferences": [job.owner_reference()],
    }
    if annotations:
        metadata["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


def _affinity(pool: str, ctx: PodContext) -> dict[str, Any]:
    """Required: a node of the pool, not excluded, and one worker of a generation per node.

    Pool-level affinity rather than ``nodeName`` keeps the real scheduler in charge
    (taints, capacity, preemption), while the anti-affinity keeps the plan's
    one-node-per-slot assumption.
    """
    expressions: list[dict[str, Any]] = [
        {"key": ctx.pool_label, "operator": "In", "values": [pool]}
    ]
    if ctx.excluded_nodes:
        expressions.append(
            {
                "key": "kubernetes.io/hostname",
                "operator": "NotIn",
                "values": sorted(ctx.excluded_nodes),
            }
        )
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": expressions}]
            }
        },
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {
                    "topologyKey": "kubernetes.io/hostname",
                    "labelSelector": {
                        "matchLabels": {
                            JOB_LABEL: ctx.job.name,
                            GENERATION_LABEL: str(ctx.generation),
                        }
                    },
                }
            ]
        },
    }


def _checkpoint_volume(volume: CheckpointVolume) -> dict[str, Any]:
    if volume.persistent_volume_claim is not None:
        return {"persistentVolumeClaim": {"claimName": volume.persistent_volume_claim}}
    if volume.host_path is not None:
        return {"hostPath": {"path": volume.host_path, "type": "DirectoryOrCreate"}}
    return {"emptyDir": {}}


def _gang_labels(spec: MoEJobSpec, job: str, generation: int) -> dict[str, str]:
    group = pod_group_name(job, generation)
    if spec.scheduling.gang == "kueue" and spec.scheduling.queue_name:
        return {
            "kueue.x-k8s.io/queue-name": spec.scheduling.queue_name,
            "kueue.x-k8s.io/pod-group-name": group,
        }
    if spec.scheduling.gang == "coscheduling":
        return {"scheduling.x-k8s.io/pod-group": group}
    return {}
