"""The Helm chart without a cluster: lint, rendering, least-privilege RBAC, values schema,
the CRD kept identical to crds/moejob.yaml, the catalog ConfigMap, the dashboard."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from hetmoe_operator.api.catalog import DeviceCatalog, DeviceGrade, OperationEfficiency
from tests.charts.conftest import (
    CHART_DIR,
    KNOWN_METRICS,
    OPERATOR_METRICS,
    REPO_ROOT,
    TRAINER_METRICS,
    RenderFn,
    family_name,
    find,
    kinds,
    run_helm,
    value_args,
)

DASHBOARD = CHART_DIR / "dashboards" / "hetmoe.json"
PROMETHEUS_EXAMPLE = REPO_ROOT / "examples" / "prometheus" / "prometheus.yml"


CLUSTER = {"operator": {"scope": "cluster"}}
NAMESPACE = {"operator": {"scope": "namespace", "watchNamespace": "team-a"}}

# The exact rules, as (apiGroups, resources, resourceNames, verbs). Anything more is a
# least-privilege regression; anything less breaks the operator (see rbac.yaml).
NAMESPACED_RULES = [
    (("hetmoe.io",), ("moejobs",), (), ("get", "list", "watch", "patch")),
    (("hetmoe.io",), ("moejobs/status",), (), ("get", "patch")),
    (("",), ("pods",), (), ("get", "list", "watch", "create", "patch", "delete")),
    (("",), ("configmaps",), (), ("get", "list", "watch", "create", "update", "patch", "delete")),
    (("",), ("services",), (), ("get", "list", "watch", "create", "patch", "delete")),
    (("",), ("events",), (), ("create", "patch")),
    (("scheduling.x-k8s.io",), ("podgroups",), (), ("create",)),
]
CLUSTER_READ_RULES = [
    (("",), ("nodes",), (), ("get", "list", "watch")),
    (("apiextensions.k8s.io",), ("customresourcedefinitions",), (), ("get", "list", "watch")),
]


def peering_rules(plural: str, name: str = "hetmoe") -> list[tuple[Any, ...]]:
    return [
        (("kopf.dev",), (plural,), (), ("list", "watch")),
        (("kopf.dev",), (plural,), (name,), ("get", "patch")),
    ]


def normalised(rules: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (
            tuple(r.get("apiGroups", [])),
            tuple(r.get("resources", [])),
            tuple(r.get("resourceNames", [])),
            tuple(r.get("verbs", [])),
        )
        for r in rules
    ]


def rbac_objects(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["apiVersion"].startswith("rbac.authorization.k8s.io/")]


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = find(objects, "Deployment")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


# --- lint --------------------------------------------------------------------------


@pytest.mark.parametrize("values", [CLUSTER, NAMESPACE], ids=["cluster", "namespace"])
def test_helm_lint_strict(helm_bin: Path, tmp_path: Path, values: dict[str, Any]) -> None:
    result = run_helm(helm_bin, "lint", "--strict", str(CHART_DIR), *value_args(values, tmp_path))
    assert "0 chart(s) failed" in result.stdout, result.stdout


def test_lint_with_servicemonitor_and_overrides(helm_bin: Path, tmp_path: Path) -> None:
    values = {
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops"}],
        "image": {"repository": "registry.example/hetmoe/operator", "tag": "1.2.3"},
    }
    run_helm(helm_bin, "lint", "--strict", str(CHART_DIR), *value_args(values, tmp_path))


# --- RBAC --------------------------------------------------------------------------


def test_cluster_mode_rbac_is_one_clusterrole_with_exact_rules(render: RenderFn) -> None:
    objects = render(CLUSTER)
    assert kinds(rbac_objects(objects)) == ["ClusterRole", "ClusterRoleBinding"]
    role = find(objects, "ClusterRole", "hetmoe")
    assert normalised(role["rules"]) == (
        CLUSTER_READ_RULES + NAMESPACED_RULES + peering_rules("clusterkopfpeerings")
    )
    binding = find(objects, "ClusterRoleBinding", "hetmoe")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "hetmoe",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "hetmoe", "namespace": "hetmoe-system"}
    ]
    assert "--all-namespaces" in container(objects)["command"]
    assert "--namespace" not in container(objects)["command"]
    peering = find(objects, "ClusterKopfPeering", "hetmoe")
    assert peering["apiVersion"] == "kopf.dev/v1"


def test_namespace_mode_rbac_is_a_role_plus_cluster_scoped_reads(render: RenderFn) -> None:
    objects = render(NAMESPACE)
    assert kinds(rbac_objects(objects)) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
    ]
    # Nodes and CRDs are cluster-scoped, and free capacity needs the pods bound to
    # nodes from every namespace: only those reads stay in a ClusterRole.
    cluster_role = find(objects, "ClusterRole")
    assert cluster_role["metadata"]["name"] == "hetmoe-hetmoe-system"
    assert normalised(cluster_role["rules"]) == [
        *CLUSTER_READ_RULES,
        (("",), ("pods",), (), ("list",)),
    ]
    role = find(objects, "Role", "hetmoe")
    assert role["metadata"]["namespace"] == "team-a"
    assert normalised(role["rules"]) == NAMESPACED_RULES + peering_rules("kopfpeerings")
    binding = find(objects, "RoleBinding", "hetmoe")
    assert binding["metadata"]["namespace"] == "team-a"
    assert binding["roleRef"]["kind"] == "Role"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "hetmoe", "namespace": "hetmoe-system"}
    ]
    command = container(objects)["command"]
    assert command[command.index("--namespace") + 1] == "team-a"
    assert "--all-namespaces" not in command
    peering = find(objects, "KopfPeering", "hetmoe")
    assert peering["metadata"]["namespace"] == "team-a"
    assert not [o for o in objects if o["kind"] == "ClusterKopfPeering"]


def test_namespace_mode_defaults_to_the_release_namespace(render: RenderFn) -> None:
    objects = render({"operator": {"scope": "namespace"}}, namespace="ml")
    assert find(objects, "Role")["metadata"]["namespace"] == "ml"
    command = container(objects)["command"]
    assert command[command.index("--namespace") + 1] == "ml"


@pytest.mark.parametrize("values", [CLUSTER, NAMESPACE], ids=["cluster", "namespace"])
def test_rbac_has_no_wildcards_and_no_secrets(render: RenderFn, values: dict[str, Any]) -> None:
    for obj in rbac_objects(render(values)):
        for rule in obj.get("rules", []):
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule.get(key, []), f"{obj['kind']} wildcard {key}: {rule}"
            assert "secrets" not in rule.get("resources", [])
            assert not {"escalate", "bind", "impersonate"} & set(rule.get("verbs", []))


def test_rbac_can_be_disabled(render: RenderFn) -> None:
    objects = render({"rbac": {"create": False}, "serviceAccount": {"create": False}})
    assert not rbac_objects(objects)
    assert not [o for o in objects if o["kind"] == "ServiceAccount"]
    pod = find(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "default"


# --- Deployment --------------------------------------------------------------------


def test_deployment_runs_two_peered_replicas_with_the_documented_command(
    render: RenderFn,
) -> None:
    objects = render()
    deployment = find(objects, "Deployment", "hetmoe")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "hetmoe"
    main = container(objects)
    assert main["command"] == [
        "hetmoe",
        "operator",
        "--peering",
        "hetmoe",
        "--metrics-port",
        "8080",
        "--catalog",
        "/etc/hetmoe/catalog/catalog.yaml",
        "--all-namespaces",
    ]
    assert main["image"] == "hetmoe/operator:0.1.0"
    env = {e["name"]: e for e in main["env"]}
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert main["ports"] == [{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}]
    for probe in ("livenessProbe", "readinessProbe"):
        assert main[probe]["httpGet"]["port"] == "metrics"
    mounts = {m["name"]: m for m in main["volumeMounts"]}
    assert mounts["catalog"]["mountPath"] == "/etc/hetmoe/catalog"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["catalog"]["configMap"]["name"] == "hetmoe-catalog"
    assert "emptyDir" in volumes["tmp"]
    assert find(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_pod_security_and_resources(render: RenderFn) -> None:
    objects = render()
    pod = find(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container(objects)["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    resources = container(objects)["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"}
    assert set(resources["limits"]) == {"cpu", "memory"}


def test_scheduling_and_image_values_reach_the_pod(render: RenderFn) -> None:
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "ops", "operator": "Exists"}]}]
            }
        }
    }
    tolerations = [
        {"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}
    ]
    objects = render(
        {
            "image": {"repository": "reg.example/op", "tag": "9.9", "pullPolicy": "Always"},
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": tolerations,
            "affinity": affinity,
            "replicaCount": 3,
            "operator": {"metricsPort": 9090, "extraArgs": ["--verbose"]},
        }
    )
    deployment = find(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 3
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"] == tolerations
    assert pod["affinity"] == affinity
    main = container(objects)
    assert main["image"] == "reg.example/op:9.9"
    assert main["imagePullPolicy"] == "Always"
    assert main["command"][main["command"].index("--metrics-port") + 1] == "9090"
    assert main["command"][-1] == "--verbose"
    assert main["ports"][0]["containerPort"] == 9090


def test_catalog_change_rolls_the_pods(render: RenderFn) -> None:
    def checksum(objects: list[dict[str, Any]]) -> str:
        annotations = find(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
        return str(annotations["checksum/catalog"])

    changed = {"catalog": {"crossPoolGbps": 50}}
    assert checksum(render()) != checksum(render(changed))


def test_metrics_service_and_optional_servicemonitor(render: RenderFn) -> None:
    objects = render()
    service = find(objects, "Service", "hetmoe-metrics")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    deployment = find(objects, "Deployment")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert not [o for o in objects if o["kind"] == "ServiceMonitor"]

    objects = render({"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "p"}}}})
    monitor = find(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "p"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]


def test_optional_podmonitor_scrapes_the_trainer_workers(render: RenderFn) -> None:
    assert not [o for o in render() if o["kind"] == "PodMonitor"]
    monitor = find(render({"metrics": {"podMonitor": {"enabled": True}}}), "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"] == {"hetmoe.io/role": "worker"}
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    keep = monitor["spec"]["podMetricsEndpoints"][0]["relabelings"][0]
    assert keep["action"] == "keep"
    assert keep["sourceLabels"] == ["__meta_kubernetes_pod_container_port_name"]
    assert re.fullmatch(keep["regex"], "metrics") and re.fullmatch(keep["regex"], "metrics-3")
    assert not re.fullmatch(keep["regex"], "rendezvous")
    values = {**NAMESPACE, "metrics": {"podMonitor": {"enabled": True}}}
    monitor = find(render(values), "PodMonitor")
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}


# --- values.schema.json ------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicaCount": "two"}, "at '/replicaCount': got string, want integer"),
        (
            {"catalog": {"grades": [{"name": "A", "peakBf16Tflops": 370, "pricePerHour": 7}]}},
            "at '/catalog/grades/0': missing property 'memoryGib'",
        ),
        ({"operator": {"scope": "everywhere"}}, "at '/operator/scope'"),
        (
            {
                "catalog": {
                    "grades": [
                        {
                            "name": "A",
                            "peakBf16Tflops": 370,
                            "memoryGib": 64,
                            "pricePerHour": 7,
                            "efficiency": {"attention": 1.5},
                        }
                    ]
                }
            },
            "at '/catalog/grades/0/efficiency/attention'",
        ),
        ({"catalog": {"grades": []}}, "at '/catalog/grades'"),
        ({"replicas": 2}, "additional properties 'replicas' not allowed"),
    ],
    ids=[
        "replicas-string",
        "grade-without-memory",
        "bad-scope",
        "efficiency>1",
        "no-grades",
        "typo",
    ],
)
def test_schema_rejects_bad_values_with_the_path(
    helm_bin: Path, tmp_path: Path, values: dict[str, Any], message: str
) -> None:
    result = run_helm(
        helm_bin, "template", "x", str(CHART_DIR), *value_args(values, tmp_path), check=False
    )
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


def test_duplicate_grade_names_fail_with_a_clear_message(helm_bin: Path, tmp_path: Path) -> None:
    grade = {"name": "A", "peakBf16Tflops": 1, "memoryGib": 1, "pricePerHour": 1}
    values = {"catalog": {"grades": [grade, grade]}}
    result = run_helm(
        helm_bin, "template", "x", str(CHART_DIR), *value_args(values, tmp_path), check=False
    )
    assert result.returncode != 0
    assert 'duplicate grade name "A"' in result.stderr, result.stderr


# --- CRDs --------------------------------------------------------------------------


def test_chart_crd_is_identical_to_the_generated_one(helm_bin: Path, tmp_path: Path) -> None:
    source = REPO_ROOT / "crds" / "moejob.yaml"
    chart_crd = CHART_DIR / "crds" / "moejob.yaml"
    assert source.is_file(), "crds/moejob.yaml is missing: run `make crd`"
    assert chart_crd.read_bytes() == source.read_bytes(), (
        "charts/hetmoe/crds/moejob.yaml differs from crds/moejob.yaml; it must stay a "
        "symlink to ../../../crds/moejob.yaml"
    )
    # What users install is the packaged chart: the symlink must be followed there too.
    run_helm(helm_bin, "package", str(CHART_DIR), "--destination", str(tmp_path))
    (archive,) = tmp_path.glob("hetmoe-*.tgz")
    with tarfile.open(archive) as tar:
        member = tar.extractfile("hetmoe/crds/moejob.yaml")
        assert member is not None
        assert member.read() == source.read_bytes()


def test_crds_ship_the_moejob_and_kopf_peering_definitions(render: RenderFn) -> None:
    objects = render(extra=["--include-crds"])
    crds = {o["metadata"]["name"]: o for o in objects if o["kind"] == "CustomResourceDefinition"}
    assert set(crds) == {
        "moejobs.hetmoe.io",
        "clusterkopfpeerings.kopf.dev",
        "kopfpeerings.kopf.dev",
    }
    assert crds["clusterkopfpeerings.kopf.dev"]["spec"]["scope"] == "Cluster"
    assert crds["kopfpeerings.kopf.dev"]["spec"]["scope"] == "Namespaced"
    # Without --include-crds they are not templates: Helm installs them first and
    # never deletes them on uninstall.
    assert not [o for o in render() if o["kind"] == "CustomResourceDefinition"]


# --- device catalog ----------------------------------------------------------------


def catalog_from(objects: list[dict[str, Any]]) -> DeviceCatalog:
    config_map = find(objects, "ConfigMap", "hetmoe-catalog")
    return DeviceCatalog.model_validate(yaml.safe_load(config_map["data"]["catalog.yaml"]))


def test_default_catalog_is_the_five_reference_grades(render: RenderFn) -> None:
    catalog = catalog_from(render())
    assert catalog.currency == "RMB"
    # Ling report, Table 1: peak bf16 TFLOPS, memory, price (RMB/h), FP8.
    expected = {
        "A": (370, 64, 7.0, False),
        "B": (120, 96, 4.5, False),
        "C": (312, 80, 10.0, False),
        "D": (989, 80, 27.5, True),
        "E": (147, 96, 5.64, True),
    }
    got = {
        g.name: (g.peak_bf16_tflops, g.memory_gib, g.price_per_hour, g.fp8) for g in catalog.grades
    }
    assert got == expected
    for grade in catalog.grades:
        assert grade.resource_name == "nvidia.com/gpu"
        assert "assumed" in grade.description
    # The report's headline: per peak PFLOP-hour A costs about 18.9 RMB, D about 27.8.
    a, d = catalog.grade("A"), catalog.grade("D")
    assert round(a.price_per_hour / a.peak_bf16_tflops * 1000, 1) == 18.9
    assert round(d.price_per_hour / d.peak_bf16_tflops * 1000, 1) == 27.8


def test_custom_catalog_round_trips_into_device_catalog(render: RenderFn) -> None:
    grade = {
        "name": "h20",
        "description": "custom",
        "peakBf16Tflops": 148,
        "memoryGib": 96,
        "pricePerHour": 6,
        "intraNodeGbps": 450,
        "interNodeGbps": 50,
        "fp8": True,
        "efficiency": {
            "attention": 0.5,
            "expertFfn": 0.4,
            "denseFfn": 0.6,
            "embedding": 0.5,
            "optimizer": 0.1,
        },
        "resourceName": "nvidia.com/gpu",
    }
    values = {"catalog": {"currency": "USD", "crossPoolGbps": 25, "grades": [grade]}}
    catalog = catalog_from(render(values))
    assert catalog.to_wire() == {"currency": "USD", "crossPoolGbps": 25.0, "grades": [grade]}


def test_values_schema_grade_matches_the_catalog_model() -> None:
    """values.schema.json knows exactly DeviceGrade's fields, and requires the same ones."""
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    grade_schema = schema["definitions"]["grade"]
    fields = DeviceGrade.model_fields
    assert set(grade_schema["properties"]) == {f.alias for f in fields.values()}
    assert set(grade_schema["required"]) == {f.alias for f in fields.values() if f.is_required()}
    efficiency = OperationEfficiency.model_fields
    assert set(schema["definitions"]["efficiency"]["properties"]) == {
        f.alias for f in efficiency.values()
    }


# --- Grafana dashboard -------------------------------------------------------------


def dashboard_panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return [p for p in panels if p.get("type") != "row"]


def metric_names(expr: str) -> set[str]:
    """hetmoe_* series in a PromQL expression, with histogram suffixes folded."""
    names = set()
    for token in re.findall(r"\bhetmoe_[a-z0-9_]+", expr):
        for suffix in ("_bucket", "_sum", "_count"):
            base = token.removesuffix(suffix)
            if base != token and KNOWN_METRICS.get(base) == "histogram":
                token = base
        names.add(token)
    return names


def test_dashboard_is_valid_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard_panels():
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])


def test_every_dashboard_expression_names_a_known_metric() -> None:
    used: set[str] = set()
    for panel in dashboard_panels():
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names, f"{panel['title']!r}: no hetmoe metric in {target['expr']!r}"
            unknown = names - set(KNOWN_METRICS)
            assert not unknown, f"{panel['title']!r}: unknown metrics {unknown}"
            used |= names
            # Histograms are only meaningful through their buckets.
            for name in names:
                if KNOWN_METRICS[name] == "histogram":
                    assert f"{name}_bucket" in target["expr"], target["expr"]
    assert used == set(KNOWN_METRICS), f"metrics without a panel: {set(KNOWN_METRICS) - used}"


def test_every_dashboard_expression_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each expression (as a recording rule): no syntax errors ship."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (tests/local/install_prometheus.sh installs it)")
    exprs = [t["expr"] for panel in dashboard_panels() for t in panel["targets"]]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"hetmoe:dashboard:{i}", "expr": e} for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_metrics_are_exported_by_the_operator_and_trainer_code() -> None:
    """The names above are the ones the code really registers (same names, same types)."""
    from hetmoe_operator.kube.metrics import OperatorMetrics
    from hetmoe_trainer.metrics import TrainerMetrics

    for registry, expected in (
        (OperatorMetrics().registry, OPERATOR_METRICS),
        (TrainerMetrics(plan_rank=0, stage=0).registry, TRAINER_METRICS),
    ):
        families = {family.name: family.type for family in registry.collect()}
        for name, kind in expected.items():
            assert families.get(family_name(name, kind)) == kind, (
                f"dashboard metric {name} ({kind}) is not exported by the code; "
                f"it exports: {sorted(families)}"
            )


def test_dashboard_configmap_ships_the_file_for_the_grafana_sidecar(render: RenderFn) -> None:
    config_map = find(render(), "ConfigMap", "hetmoe-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["hetmoe.json"]) == json.loads(DASHBOARD.read_text())
    assert not [
        o
        for o in render({"dashboard": {"enabled": False}})
        if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "hetmoe-dashboard"
    ]


def test_prometheus_example_scrapes_operator_and_trainer_ports() -> None:
    from hetmoe_operator.local.supervisor import SCRAPE_TARGETS

    config = yaml.safe_load(PROMETHEUS_EXAMPLE.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    operator_targets = [
        t for sc in jobs["hetmoe-operator"]["static_configs"] for t in sc["targets"]
    ]
    assert operator_targets == ["localhost:8080"]  # `hetmoe operator` default --metrics-port
    # Local runs pick free ports and list them where `hetmoe run` writes them.
    (files,) = [sd["files"] for sd in jobs["hetmoe-trainer"]["file_sd_configs"]]
    resolved = (PROMETHEUS_EXAMPLE.parent / files[0]).resolve()
    assert resolved == (REPO_ROOT / "runs" / "tiny" / SCRAPE_TARGETS).resolve()
    promtool = shutil.which("promtool")
    if promtool is not None:
        check = subprocess.run(
            [promtool, "check", "config", "--syntax-only", str(PROMETHEUS_EXAMPLE)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert check.returncode == 0, check.stdout + check.stderr
