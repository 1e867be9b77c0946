"""Generate the MoEJob CustomResourceDefinition from the pydantic models.

The pydantic models are the single source of truth: this module turns their JSON
Schema into a Kubernetes *structural* OpenAPI v3 schema (no ``$ref``, no ``anyOf``,
every node typed), keeps descriptions so ``kubectl explain`` documents every field,
and adds CEL ``x-kubernetes-validations`` for the cross-field rules the models check
in Python, so the API server rejects the same manifests ``hetmoe plan`` rejects,
with the field path in the error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hetmoe_operator.api.job import GROUP, KIND, PLURAL, SHORT_NAME, VERSION, MoEJobSpec
from hetmoe_operator.api.status import MoEJobStatus

Schema = dict[str, Any]

# Only these JSON Schema keywords survive. Dropped on purpose: ``title`` (noise in
# ``kubectl explain``), ``default`` (defaults stay in one place, the models, so a
# stored object means what the operator reads) and ``additionalProperties: false``
# (forbidden next to ``properties``; unknown fields are pruned by the API server and
# rejected by kubectl's strict field validation).
_COPIED_KEYS = (
    "type",
    "description",
    "enum",
    "pattern",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "maxProperties",
    "minProperties",
    "format",
)

_DNS_LABEL = "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"

# CEL rules per pydantic model, mirroring its model validators. Each is
# (rule, message, fieldPath or None); ``has()`` guards optional fields.
CEL_RULES: Mapping[str, tuple[tuple[str, str], ...]] = {
    "ModelSpec": (
        (
            "has(self.preset) != has(self.architecture)",
            "set exactly one of model.preset and model.architecture",
        ),
    ),
    "ModelArchitecture": (
        (
            "self.num_attention_heads % self.num_key_value_heads == 0",
            "num_attention_heads must be a multiple of num_key_value_heads",
        ),
        (
            "self.num_experts_per_tok <= self.num_experts",
            "num_experts_per_tok cannot exceed num_experts",
        ),
        (
            "!has(self.first_k_dense_replace) || "
            "self.first_k_dense_replace <= self.num_hidden_layers",
            "first_k_dense_replace cannot exceed num_hidden_layers",
        ),
        (
            "!has(self.first_k_dense_replace) || self.first_k_dense_replace == 0 || "
            "has(self.intermediate_size)",
            "intermediate_size is required when first_k_dense_replace > 0",
        ),
        (
            "has(self.head_dim) || self.hidden_size % self.num_attention_heads == 0",
            "set head_dim: hidden_size is not divisible by num_attention_heads",
        ),
    ),
    "TrainingConfig": (
        (
            "has(self.steps) != has(self.tokens)",
            "set exactly one of training.steps and training.tokens",
        ),
    ),
    "DataSource": (
        (
            "!has(self.kind) || self.kind != 'files' || has(self.path)",
            "data.path is required when data.kind is 'files'",
        ),
    ),
    "PoolRef": (
        (
            "has(self.name) != has(self.selector)",
            "a pool entry sets exactly one of name and selector",
        ),
        (
            "!has(self.minNodes) || !has(self.maxNodes) || self.minNodes <= self.maxNodes",
            "minNodes cannot exceed maxNodes",
        ),
    ),
    "PlacementSpec": (
        (
            "!has(self.objective) || self.objective != 'throughput-under-budget' || "
            "has(self.budgetPerHour)",
            "objective throughput-under-budget needs budgetPerHour",
        ),
    ),
    "FailureRule": (
        (
            "(has(self.exitCodes) && size(self.exitCodes) > 0) || "
            "(has(self.reasons) && size(self.reasons) > 0)",
            "a failure rule must list exitCodes or reasons",
        ),
    ),
    "ElasticSpec": (
        (
            "!has(self.minNodes) || !has(self.maxNodes) || self.minNodes <= self.maxNodes",
            "elastic.minNodes cannot exceed elastic.maxNodes",
        ),
    ),
    "CheckpointVolume": (
        (
            "(has(self.persistentVolumeClaim) ? 1 : 0) + (has(self.hostPath) ? 1 : 0) + "
            "((has(self.emptyDir) && self.emptyDir) ? 1 : 0) == 1",
            "checkpoint.volume sets exactly one of persistentVolumeClaim, hostPath, emptyDir",
        ),
    ),
    "SchedulingSpec": (
        (
            "!has(self.gang) || self.gang != 'kueue' || has(self.queueName)",
            "scheduling.gang kueue needs scheduling.queueName",
        ),
    ),
}

# Fields that cannot change once the job exists: a running job's model and budget
# define its checkpoints; the checkpoint volume is where it resumes from.
IMMUTABLE_FIELDS: Mapping[str, tuple[str, ...]] = {
    "MoEJobSpec": ("model", "training"),
    "CheckpointSpec": ("volume",),
}

# Lists keyed by a field (merge semantics and uniqueness enforced by the API server).
LIST_MAP_KEYS: Mapping[tuple[str, str], str] = {
    ("ElasticSpec", "failureRules"): "name",
    ("MoEJobStatus", "conditions"): "type",
}

PRINTER_COLUMNS: tuple[dict[str, Any], ...] = (
    {
        "name": "Phase",
        "type": "string",
        "jsonPath": ".status.phase",
        "description": "Lifecycle phase.",
    },
    {
        "name": "Grades",
        "type": "string",
        "jsonPath": ".status.grades",
        "description": "Accelerator grades in use with node counts.",
    },
    {
        "name": "Step",
        "type": "integer",
        "jsonPath": ".status.progress.step",
        "description": "Optimizer steps done.",
    },
    {
        "name": "Restarts",
        "type": "integer",
        "jsonPath": ".status.restarts",
        "description": "Restarts counted towards elastic.maxRestarts.",
    },
    {
        "name": "Tokens/s",
        "type": "number",
        "jsonPath": ".status.progress.tokensPerSecond",
        "description": "Measured training throughput.",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
)


class _Converter:
    """Turns one pydantic JSON Schema (with ``$defs``) into a structural schema."""

    def __init__(self, root: Schema) -> None:
        self._defs: Mapping[str, Schema] = root.get("$defs", {})

    def convert(self, node: Schema, model_name: str | None = None) -> Schema:
        """Structural schema for ``node``; ``model_name`` names the pydantic model it is."""
        node = dict(node)
        if "$ref" in node:
            name = node.pop("$ref").rsplit("/", 1)[-1]
            target = self.convert(self._defs[name], name)
            if "description" in node:
                target["description"] = node["description"]
            return target
        if "anyOf" in node:
            variants = [v for v in node.pop("anyOf") if v.get("type") != "null"]
            if len(variants) != 1:
                raise ValueError(f"cannot express union {variants} in a structural schema")
            inner = self.convert(variants[0])
            if "description" in node:
                inner["description"] = node["description"]
            return inner
        out: Schema = {k: node[k] for k in _COPIED_KEYS if k in node}
        if "const" in node:
            out["enum"] = [node["const"]]
            out.setdefault("type", _json_type(node["const"]))
        if "exclusiveMinimum" in node:
            out["minimum"] = node["exclusiveMinimum"]
            out["exclusiveMinimum"] = True
        if "exclusiveMaximum" in node:
            out["maximum"] = node["exclusiveMaximum"]
            out["exclusiveMaximum"] = True
        kind = node.get("type")
        if kind == "object" and "properties" in node:
            out["properties"] = {
                key: self._property(model_name, key, value)
                for key, value in node["properties"].items()
            }
            if node.get("required"):
                out["required"] = list(node["required"])
            rules = [
                {"rule": rule, "message": message}
                for rule, message in CEL_RULES.get(model_name or "", ())
            ]
            if rules:
                out["x-kubernetes-validations"] = rules
        elif kind == "object":
            extra = node.get("additionalProperties")
            out["additionalProperties"] = (
                self.convert(extra) if isinstance(extra, dict) else {"type": "string"}
            )
        elif kind == "array":
            out["items"] = self.convert(node["items"])
        return out

    def _property(self, model_name: str | None, key: str, value: Schema) -> Schema:
        prop = self.convert(value)
        if key in IMMUTABLE_FIELDS.get(model_name or "", ()):
            prop.setdefault("x-kubernetes-validations", []).append(
                {"rule": "self == oldSelf", "message": f"{key} is immutable once the job exists"}
            )
        map_key = LIST_MAP_KEYS.get((model_name or "", key))
        if map_key:
            prop["x-kubernetes-list-type"] = "map"
            prop["x-kubernetes-list-map-keys"] = [map_key]
        return prop


def _json_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string"


def structural_schema(model: type[MoEJobSpec] | type[MoEJobStatus]) -> Schema:
    """The structural OpenAPI v3 schema of one pydantic model."""
    root = model.model_json_schema(by_alias=True, mode="validation")
    return _Converter(root).convert(root, model.__name__)


def crd() -> dict[str, Any]:
    """The complete ``apiextensions.k8s.io/v1`` CustomResourceDefinition."""
    spec_schema = structural_schema(MoEJobSpec)
    status_schema = structural_schema(MoEJobStatus)
    root: Schema = {
        "type": "object",
        "description": "A mixture-of-experts training job placed across accelerator grades.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "API group and version."},
            "kind": {"type": "string", "description": "MoEJob."},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
        "x-kubernetes-validations": [
            {
                "rule": f"self.metadata.name.matches('{_DNS_LABEL}')",
                "message": "metadata.name must be a DNS label of at most 63 characters: "
                "it prefixes pod names and labels",
            }
        ],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": [SHORT_NAME],
                "categories": ["hetmoe"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [dict(c) for c in PRINTER_COLUMNS],
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def crd_yaml() -> str:
    """The CRD as YAML, exactly as committed in ``crds/moejob.yaml``."""
    import yaml

    header = "# Generated by `hetmoe crd` from the pydantic models. Do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=100)
