"""``hetmoe operator``: run the MoEJob operator (kopf), in-cluster or with a kubeconfig."""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
from concurrent.futures import ThreadPoolExecutor

RECONCILE_THREADS = 32
"""Concurrent reconcile passes (each mostly waits on the API server)."""
CREATE_THREADS = 16
"""Concurrent pod creations (shared by all passes)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``operator`` sub-command."""
    parser = subparsers.add_parser("operator", help="run the MoEJob operator")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", default=None, help="watch only this namespace")
    scope.add_argument(
        "--all-namespaces", "-A", action="store_true", help="watch every namespace (the default)"
    )
    parser.add_argument(
        "--catalog", default=None, help="device catalog YAML file (default: the ConfigMap below)"
    )
    parser.add_argument(
        "--catalog-configmap",
        default="hetmoe-catalog",
        help="ConfigMap holding the catalog (key catalog.yaml)",
    )
    parser.add_argument(
        "--operator-namespace",
        default=os.environ.get("POD_NAMESPACE", "hetmoe-system"),
        help="namespace of the catalog ConfigMap (default: $POD_NAMESPACE)",
    )
    parser.add_argument(
        "--metrics-port", type=int, default=8080, help="Prometheus port, 0 disables (default 8080)"
    )
    parser.add_argument(
        "--peering",
        default=None,
        help="kopf peering name for active/standby replicas (default: standalone)",
    )
    parser.add_argument(
        "--priority",
        type=int,
        default=None,
        help="peering priority (default: random, so replicas never tie)",
    )
    parser.add_argument(
        "--resync-seconds", type=float, default=10.0, help="periodic re-check of non-terminal jobs"
    )
    parser.add_argument(
        "--progress-poll-seconds",
        type=float,
        default=15.0,
        help="how often to read rank 0's /progress",
    )
    parser.add_argument(
        "--toleration",
        action="append",
        default=[],
        metavar="KEY",
        help="extra taint key worker pods tolerate (repeatable)",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Build the operator from typed settings and hand it to kopf (imported lazily)."""
    import kopf

    from hetmoe_operator.api.operator_config import CatalogSource, OperatorConfig, Toleration
    from hetmoe_operator.kube.apply import KubeApi
    from hetmoe_operator.kube.catalog_source import CatalogLoader
    from hetmoe_operator.kube.connect import load_in_cluster_or_kubeconfig
    from hetmoe_operator.kube.handlers import OperatorContext, build_registry
    from hetmoe_operator.kube.metrics import OperatorMetrics
    from hetmoe_operator.kube.reconciler import Reconciler
    from hetmoe_operator.kube.state import JobCache, NodeCache, PodIndex, Wakeups
    from hetmoe_operator.placement.planner import plan_job

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # one line per handled watch event is noise at scale
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    config = OperatorConfig(
        namespace_mode="namespace" if args.namespace else "cluster",
        namespace=args.namespace,
        operator_namespace=args.operator_namespace,
        catalog=CatalogSource(file=args.catalog, config_map=args.catalog_configmap),
        metrics_port=args.metrics_port,
        peering=args.peering,
        resync_seconds=args.resync_seconds,
        progress_poll_seconds=args.progress_poll_seconds,
        worker_tolerations=[Toleration(key=key) for key in args.toleration],
    )
    load_in_cluster_or_kubeconfig()
    from kubernetes.client import ApiClient, Configuration

    configuration = Configuration.get_default_copy()
    configuration.connection_pool_maxsize = RECONCILE_THREADS + CREATE_THREADS
    client = ApiClient(configuration)
    metrics = OperatorMetrics()
    api = KubeApi(client, metrics)
    jobs, nodes, pods, wakeups = JobCache(), NodeCache(), PodIndex(), Wakeups()
    reconciler = Reconciler(
        config=config,
        api=api,
        catalog=CatalogLoader(config.catalog, config.operator_namespace, api.core),
        jobs=jobs,
        nodes=nodes,
        pods=pods,
        wakeups=wakeups,
        metrics=metrics,
        planner=plan_job,
        create_executor=ThreadPoolExecutor(max_workers=CREATE_THREADS, thread_name_prefix="create"),
    )
    context = OperatorContext(
        reconciler=reconciler,
        jobs=jobs,
        nodes=nodes,
        pods=pods,
        wakeups=wakeups,
        peering=config.peering,
        single_namespace=args.namespace is not None,
        metrics_port=config.metrics_port,
        executor=ThreadPoolExecutor(max_workers=RECONCILE_THREADS, thread_name_prefix="reconcile"),
    )
    kopf.run(
        registry=build_registry(),
        clusterwide=args.namespace is None,
        namespaces=[args.namespace] if args.namespace else (),
        standalone=config.peering is None,
        peering_name=config.peering,
        # kopf pauses every replica when the highest priorities tie.
        priority=args.priority if args.priority is not None else random.randint(1, 1 << 30),
        memo=kopf.Memo(ctx=context),
    )
    return 0


def main() -> int:
    """Entry point for ``python -m hetmoe_operator.cli.operator_command``: the container
    image runs this so the operator never imports the other sub-commands' modules."""
    parser = argparse.ArgumentParser(prog="hetmoe operator")
    subparsers = parser.add_subparsers(dest="command", required=True)
    register(subparsers)
    return run(parser.parse_args(["operator", *sys.argv[1:]]))


if __name__ == "__main__":
    raise SystemExit(main())
