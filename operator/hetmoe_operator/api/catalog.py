"""The device catalog: what each accelerator grade can do and what it costs.

Achieved efficiency is not published for most devices, so every grade carries it
explicitly per operation class; the planner never assumes peak throughput.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from hetmoe_operator.api.base import ApiModel

DEFAULT_RESOURCE_NAME = "nvidia.com/gpu"


class OperationEfficiency(ApiModel):
    """Achieved fraction of peak bf16 throughput, per class of operation."""

    attention: float = Field(default=0.35, gt=0, le=1)
    """Attention projections and the attention kernel itself."""
    expert_ffn: float = Field(default=0.30, gt=0, le=1)
    """Routed and shared expert GEMMs (small, grouped: usually the least efficient)."""
    dense_ffn: float = Field(default=0.45, gt=0, le=1)
    """Dense FFN layers."""
    embedding: float = Field(default=0.40, gt=0, le=1)
    """Input embedding and LM head."""
    optimizer: float = Field(default=0.05, gt=0, le=1)
    """Fraction of memory bandwidth-bound optimizer work, as a fraction of peak."""


class MeasuredThroughput(ApiModel):
    """Effective TFLOP/s per operation class, measured (``hetmoe profile``) rather than
    assumed: when a grade carries it, it replaces peak x efficiency in the planner and
    in local mode's simulated slowdowns."""

    attention: float = Field(gt=0)
    """Attention block (norm, projections, scores), forward + backward."""
    expert_ffn: float = Field(gt=0)
    """MoE block (router, routed and shared experts, dispatch), forward + backward."""
    dense_ffn: float = Field(gt=0)
    """Dense FFN block, forward + backward."""
    embedding: float = Field(gt=0)
    """Embedding lookup, final norm, LM head and loss, forward + backward."""
    optimizer: float = Field(gt=0)
    """Optimizer step, in the cost model's FLOPs per parameter."""
    attention_fixed_seconds: float = Field(default=0, ge=0)
    """Fixed seconds per layer and microbatch (forward + backward) on top of the
    per-token time: launch and framework overhead that small microbatches pay."""
    expert_ffn_fixed_seconds: float = Field(default=0, ge=0)
    """Same, per MoE block."""
    dense_ffn_fixed_seconds: float = Field(default=0, ge=0)
    """Same, per dense FFN block."""
    embedding_fixed_seconds: float = Field(default=0, ge=0)
    """Same, for embedding, LM head and loss."""
    source: str = ""
    """Where the figures come from (profile file, machine, model, date)."""


class DeviceGrade(ApiModel):
    """One accelerator grade: peak speed, memory, interconnect, price and efficiency."""

    name: str = Field(pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
    """Grade name, matched against the value of the node grade label."""
    description: str = ""
    """Free text, e.g. the device family."""
    peak_bf16_tflops: float = Field(gt=0)
    """Peak dense bf16 throughput of one device, TFLOP/s."""
    memory_gib: float = Field(gt=0)
    """Device memory, GiB."""
    price_per_hour: float = Field(ge=0)
    """Price of one device for one hour, in the catalog's currency."""
    intra_node_gbps: float = Field(default=200.0, gt=0)
    """Device-to-device bandwidth inside a node, GB/s."""
    inter_node_gbps: float = Field(default=25.0, gt=0)
    """Per-device network bandwidth to other nodes of the same pool, GB/s."""
    fp8: bool = False
    """Whether the device supports FP8 GEMMs (informational)."""
    efficiency: OperationEfficiency = OperationEfficiency()
    """Achieved efficiency per operation class (an assumption unless measured)."""
    measured: MeasuredThroughput | None = None
    """Measured effective throughput per operation class; overrides peak x efficiency."""
    resource_name: str = DEFAULT_RESOURCE_NAME
    """Kubernetes extended resource that counts these devices on a Node."""

    def effective_tflops(self, operation: str) -> float:
        """Measured throughput of ``operation`` (a field of OperationEfficiency) when the
        grade has a profile, else peak times the achieved efficiency."""
        if self.measured is not None:
            return float(getattr(self.measured, operation))
        return self.peak_bf16_tflops * float(getattr(self.efficiency, operation))


class DeviceCatalog(ApiModel):
    """All grades a cluster may contain, plus the bandwidth between pools."""

    currency: str = "RMB"
    """Currency of every price in the catalog."""
    cross_pool_gbps: float = Field(default=12.5, gt=0)
    """Per-device bandwidth between nodes of different pools, GB/s."""
    grades: list[DeviceGrade] = Field(min_length=1, max_length=64)
    """Known grades, unique by name."""

    @model_validator(mode="after")
    def _unique_names(self) -> DeviceCatalog:
        names = [g.name for g in self.grades]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate grade names in catalog: {', '.join(duplicates)}")
        return self

    def grade(self, name: str) -> DeviceGrade:
        """The grade called ``name``; KeyError names the known grades."""
        for grade in self.grades:
            if grade.name == name:
                return grade
        known = ", ".join(g.name for g in self.grades)
        raise KeyError(f"unknown accelerator grade {name!r}; the catalog knows: {known}")
