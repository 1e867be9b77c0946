"""``hetmoe status NAME``: the MoEJob's status, the same truth as the printer columns.

Reads only ``.status`` fields the operator writes (never the last condition), then
adds what does not fit in columns: conditions, the plan per pool, the last failure.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``status`` sub-command."""
    parser = subparsers.add_parser("status", help="show a MoEJob's status")
    parser.add_argument("name", help="MoEJob name")
    parser.add_argument(
        "--namespace", "-n", default=None, help="namespace (default: the kubeconfig context's)"
    )
    parser.add_argument("--output", "-o", choices=("text", "json"), default="text")
    parser.set_defaults(handler=run)


def columns(job: dict[str, Any]) -> dict[str, str]:
    """The printer columns' values, from the same JSON paths as the CRD."""
    status = job.get("status") or {}
    progress = status.get("progress") or {}
    return {
        "Phase": str(status.get("phase", "")),
        "Grades": str(status.get("grades", "")),
        "Step": str(progress.get("step", "")),
        "Restarts": str(status.get("restarts", "")),
        "Tokens/s": str(progress.get("tokensPerSecond", "")),
    }


def render(job: dict[str, Any]) -> str:
    """Human-readable status."""
    status = job.get("status") or {}
    lines = [f"{job['metadata']['namespace']}/{job['metadata']['name']}"]
    lines += [f"  {key:<10} {value}" for key, value in columns(job).items()]
    progress = status.get("progress") or {}
    if progress:
        lines.append(
            f"  progress   step {progress.get('step')}/{progress.get('totalSteps')}, "
            f"loss {progress.get('loss')}, ETA {progress.get('etaSeconds')} s, "
            f"last checkpoint {status.get('lastCheckpointStep')}"
        )
    if progress.get("inPlaceRestarts"):
        lines.append(
            f"  in place   {progress['inPlaceRestarts']} restart(s) this generation; last: "
            f"{progress.get('lastInPlaceRestart') or 'reason not reported'}"
        )
    plan = status.get("plan") or {}
    if plan:
        lines.append(
            f"  plan       {plan.get('parallel')}, world {plan.get('worldSize')}, "
            f"{plan.get('predictedTokensPerSecond', 0):.0f} tokens/s predicted, "
            f"{plan.get('predictedCostPer1TTokens', 0):.0f} {plan.get('currency', '')} "
            "per 1T tokens"
        )
        for pool in plan.get("pools") or ():
            lines.append(
                f"    {pool['pool']} ({pool['grade']}): {pool['nodes']} nodes, "
                f"{pool['devices']} devices, stages {pool.get('stages')}, "
                f"layers {pool.get('layers', '')}"
            )
    failure = status.get("lastFailure")
    if failure:
        lines.append(
            f"  last failure {failure.get('cause')}: pod {failure.get('pod')} on "
            f"{failure.get('node')} exit {failure.get('exitCode')} "
            f"({failure.get('reason')}) -> {failure.get('action')}"
            + (" (the pod alone)" if failure.get("replacedAlone") else "")
        )
    if status.get("replacedPods"):
        lines.append(f"  replaced   {', '.join(status['replacedPods'])} alone in this generation")
    for condition in status.get("conditions") or ():
        lines.append(
            f"  {condition['type']:<11}{condition['status']:<6}{condition['reason']}: "
            f"{condition.get('message', '')}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Fetch the job and print it."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    from hetmoe_operator.api.job import GROUP, PLURAL, VERSION
    from hetmoe_operator.errors import UserError
    from hetmoe_operator.kube.connect import load_kubeconfig

    context_namespace = load_kubeconfig()
    namespace = args.namespace or context_namespace
    try:
        job: dict[str, Any] = client.CustomObjectsApi().get_namespaced_custom_object(  # type: ignore[assignment]
            GROUP, VERSION, namespace, PLURAL, args.name
        )
    except ApiException as error:
        raise UserError(f"moejob {namespace}/{args.name}: {error.reason}") from None
    except HTTPError as error:  # refused, timed out, TLS: the cluster is not reachable
        host = client.Configuration.get_default_copy().host
        reason = getattr(error, "reason", None) or error
        raise UserError(f"cannot reach the Kubernetes API server at {host}: {reason}") from None
    print(json.dumps(job.get("status") or {}, indent=2) if args.output == "json" else render(job))
    return 0
