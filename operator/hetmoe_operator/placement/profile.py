"""Measured device profiles: what ``hetmoe profile`` writes and the planner can use.

A catalog's peak x efficiency is a guess; a profile replaces it with seconds measured
on the device for each operation class of one model, as a line over two microbatch
sizes: seconds per token (the slope) plus fixed seconds per microbatch (launch and
framework overhead, which dominates small models on a CPU). The profile stores the raw
seconds and, converted with the cost model's own FLOP counts, the effective TFLOP/s
per class (:class:`~hetmoe_operator.api.catalog.MeasuredThroughput`), so that the
planner predicts exactly the measured times for the profiled model and scales them
by FLOPs for another one.

Several worker processes sharing the cores of one machine (local mode: 4 processes
on 2 cores) each get a fraction of the measured speed; :func:`shared_throughput`
divides by processes per core, which is the honest figure for such a "device".
"""

from __future__ import annotations

from dataclasses import replace
from typing import Final, Literal

from pydantic import Field

from hetmoe_operator.api.base import ApiModel
from hetmoe_operator.api.catalog import DeviceGrade, MeasuredThroughput
from hetmoe_operator.api.cluster import ClusterDescription
from hetmoe_operator.api.model import ModelArchitecture
from hetmoe_operator.placement.cost_model import Assumptions, head_flops, layer_flops

PROFILE_API_VERSION: Final = "hetmoe.io/profile/v1"


class OperationSeconds(ApiModel):
    """Forward + backward CPU seconds per token (optimizer: per parameter), the median
    of the timed repetitions."""

    attention: float = Field(gt=0)
    """One layer's attention block (input norm, projections, scores)."""
    expert_ffn: float = Field(gt=0)
    """One MoE layer's FFN block (post-attention norm, router, routed and shared experts)."""
    dense_ffn: float = Field(gt=0)
    """One dense layer's FFN block (post-attention norm, SwiGLU)."""
    embedding: float = Field(gt=0)
    """Embedding lookup, final norm, LM head and cross-entropy."""
    optimizer: float = Field(gt=0)
    """One AdamW step, per parameter."""
    attention_fixed: float = Field(default=0, ge=0)
    """Fixed seconds per microbatch of one attention block (intercept of the fit over
    two microbatch sizes; the fields above are its slope)."""
    expert_ffn_fixed: float = Field(default=0, ge=0)
    """Same, one MoE block."""
    dense_ffn_fixed: float = Field(default=0, ge=0)
    """Same, one dense FFN block."""
    embedding_fixed: float = Field(default=0, ge=0)
    """Same, embedding, LM head and loss."""


class LinkFit(ApiModel):
    """One communication primitive between local worker processes, as a line:
    ``latency + bytes / bandwidth`` with ``bytes`` counted as the cost model does
    (all-reduce: 2 (n-1)/n of the payload per rank; all-to-all: (n-1)/n; p2p: all)."""

    latency_seconds: float = Field(ge=0)
    """Fixed seconds per call (the intercept)."""
    gbps: float = Field(gt=0)
    """Effective GB/s (the inverse slope)."""


class CommunicationProfile(ApiModel):
    """Measured wall-clock cost of the trainer's collectives between worker processes
    on this machine. On a CPU with gloo a collective costs around a millisecond, some
    20x the catalog default, which dominates small models' data and expert
    parallelism."""

    backend: str
    """torch.distributed backend measured (``gloo`` on CPU)."""
    processes: int = Field(ge=2)
    """Processes taking part."""
    all_reduce: LinkFit
    """``all_reduce`` (gradient buckets, per-step statistics)."""
    all_to_all: LinkFit
    """``all_to_all_single`` (MoE dispatch and combine)."""
    send_recv: LinkFit
    """One-way ``send``/``recv`` (stage-to-stage activations)."""


class DeviceProfile(ApiModel):
    """One device's measured speed on one model."""

    api_version: Literal["hetmoe.io/profile/v1"] = PROFILE_API_VERSION
    """Profile format version."""
    device: str
    """What was measured, e.g. ``cpu (x86_64, 2 cores), 1 thread``."""
    threads: int = Field(ge=1)
    """Compute threads the measuring process used."""
    cores: int = Field(ge=1)
    """CPU cores of the measured machine (what worker processes on it share)."""
    model: ModelArchitecture
    """The model the seconds are for."""
    sequence_length: int = Field(ge=1)
    """Tokens per sequence of the measured microbatches."""
    microbatch_size: int = Field(ge=1)
    """Sequences of the smaller measured microbatch (the larger has 4x as many)."""
    repeats: int = Field(ge=1)
    """Timed repetitions per operation (the median is kept)."""
    seconds: OperationSeconds
    """Measured times."""
    throughput: MeasuredThroughput
    """The same, as effective TFLOP/s under the cost model's FLOP counts."""
    communication: CommunicationProfile | None = None
    """Collective latency and bandwidth between local processes (absent in profiles
    written before it was measured, or with ``--no-communication``)."""


def throughput_from_seconds(
    model: ModelArchitecture,
    sequence_length: int,
    seconds: OperationSeconds,
    source: str,
    assumptions: Assumptions | None = None,
) -> MeasuredThroughput:
    """Effective TFLOP/s per class: the cost model's forward + backward FLOPs per token
    divided by the measured seconds per token (so predictions reproduce them)."""
    a = assumptions or Assumptions()
    passes = 1.0 + a.backward_factor
    moe = next(i for i in range(model.num_hidden_layers) if model.is_moe_layer(i))
    moe_flops = layer_flops(model, moe, sequence_length)
    dense_ffn = 2.0 * model.dense_ffn_params
    return MeasuredThroughput(
        attention=passes * moe_flops.attention / seconds.attention / 1e12,
        expert_ffn=passes * moe_flops.expert_ffn / seconds.expert_ffn / 1e12,
        dense_ffn=passes * dense_ffn / seconds.dense_ffn / 1e12,
        embedding=passes * head_flops(model) / seconds.embedding / 1e12,
        optimizer=a.optimizer_flops_per_param / seconds.optimizer / 1e12,
        attention_fixed_seconds=seconds.attention_fixed,
        expert_ffn_fixed_seconds=seconds.expert_ffn_fixed,
        dense_ffn_fixed_seconds=seconds.dense_ffn_fixed,
        embedding_fixed_seconds=seconds.embedding_fixed,
        source=source,
    )


def shared_throughput(
    profile: DeviceProfile, processes: int, cores: float | None = None
) -> MeasuredThroughput:
    """What each of ``processes`` workers (as many threads each as the profile used)
    on the profiled machine gets: the profile's speed when they have a core per
    thread, else that speed x cores / (processes x threads). ``cores`` overrides the
    profile's core count, e.g. with the cores other tenants leave free on a shared
    machine (the profile's CPU seconds assume a core of one's own)."""
    cores = profile.cores if cores is None else cores
    share = min(1.0, cores / (processes * profile.threads))
    t = profile.throughput
    note = f"; shared by {processes} processes on {cores:g} cores" if share < 1 else ""
    return MeasuredThroughput(
        attention=t.attention * share,
        expert_ffn=t.expert_ffn * share,
        dense_ffn=t.dense_ffn * share,
        embedding=t.embedding * share,
        optimizer=t.optimizer * share,
        attention_fixed_seconds=t.attention_fixed_seconds / share,
        expert_ffn_fixed_seconds=t.expert_ffn_fixed_seconds / share,
        dense_ffn_fixed_seconds=t.dense_ffn_fixed_seconds / share,
        embedding_fixed_seconds=t.embedding_fixed_seconds / share,
        source=t.source + note,
    )


def with_profile(grade: DeviceGrade, throughput: MeasuredThroughput) -> DeviceGrade:
    """``grade`` with its speed taken from a profile instead of peak x efficiency."""
    return grade.model_copy(update={"measured": throughput})


def cluster_with_profiles(
    cluster: ClusterDescription, measured: dict[str, MeasuredThroughput]
) -> ClusterDescription:
    """``cluster`` whose grades named in ``measured`` take their speed from it; an
    unknown grade name is a KeyError naming the catalog's grades."""
    catalog = cluster.catalog
    for name in measured:
        catalog.grade(name)
    grades = [
        with_profile(g, measured[g.name]) if g.name in measured else g for g in catalog.grades
    ]
    return cluster.model_copy(update={"catalog": catalog.model_copy(update={"grades": grades})})


def assumptions_with_communication(
    communication: CommunicationProfile, assumptions: Assumptions | None = None
) -> Assumptions:
    """``assumptions`` whose latencies are the measured ones: collectives take the
    slower of all-reduce and all-to-all (the cost model has one collective latency),
    point-to-point the measured one-way send/recv."""
    a = assumptions or Assumptions()
    collective = max(
        communication.all_reduce.latency_seconds, communication.all_to_all.latency_seconds
    )
    return replace(
        a,
        collective_latency_s=collective,
        p2p_latency_s=communication.send_recv.latency_seconds,
    )


def grade_with_communication(
    grade: DeviceGrade, communication: CommunicationProfile
) -> DeviceGrade:
    """``grade`` whose intra- and inter-node bandwidth is the measured all-reduce
    bandwidth (local processes on one machine: both are the same loopback)."""
    gbps = communication.all_reduce.gbps
    return grade.model_copy(update={"intra_node_gbps": gbps, "inter_node_gbps": gbps})
