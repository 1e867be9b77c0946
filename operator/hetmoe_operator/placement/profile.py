"""Measured device profiles: what ``hetmoe profile`` writes and the planner can use.

A catalog's peak x efficiency is a guess; a profile replaces it with seconds measured
on the device for each operation class of one model, as a line over two microbatch
sizes: seconds per token (the slope) plus fixed seconds per microbatch (launch and
framework overhead, which dominates small models on a CPU). The profile stores the raw
seconds and, converted with the cost model's own FLOP counts, the effective TFLOP/s
per class (:class:`~hetmoe_operator.api.catalog.MeasuredThroughput`), so that the
planner predicts exactly the measured times for the profiled model and scales them
by FLOPs for another one.

Operation classes timed in isolation miss what a real training step also does:
autograd across the whole model, activations of every layer competing for the caches,
residual adds, the loss, and per step the gradient norm, the statistics all-reduce,
the anomaly detector and bookkeeping (on the tiny model on a CPU the classes alone
predicted 0.6-0.7x of a measured step). A profile therefore also times the trainer's
own step in one process (:class:`StepSeconds`); :func:`throughput_from_seconds` scales
the classes so that their sums reproduce that step's seconds per token and per
microbatch (the split between classes stays the isolated timings'), and
:func:`step_fixed_seconds` is the per-step remainder beyond the optimizer.

Several worker processes sharing the cores of one machine (local mode: 4 processes
on 2 cores) each get a fraction of the measured speed; :func:`shared_throughput`
divides by processes per core, which is the honest figure for such a "device". The
cores are the machine's, or fewer when the profile measured that two workers
alternating compute and collectives got fewer (other tenants on a shared machine).
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


class StepSeconds(ApiModel):
    """One real ``Trainer.train_step`` of the bundled trainer in one process (data,
    forward + backward of every microbatch, gradient norm, the statistics all-reduce,
    anomaly detector, AdamW, bookkeeping), CPU seconds as a line over tokens and
    microbatches, fitted by least squares over steps of one and of four microbatches
    of several sizes (``hetmoe profile``)."""

    per_token: float = Field(gt=0)
    """Forward + backward seconds per token of the whole model (the slope)."""
    per_microbatch: float = Field(ge=0)
    """Fixed seconds per microbatch of the whole model (launch and autograd overhead)."""
    per_step: float = Field(ge=0)
    """Fixed seconds per step: the optimizer and everything else outside microbatches."""
    parameters: int = Field(ge=1)
    """Parameters of the timed model (what its optimizer stepped)."""


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
    step: StepSeconds | None = None
    """The real one-process step the classes are calibrated to (absent in profiles
    written before it was measured: the classes are then used as timed)."""

    def class_totals(self, model: ModelArchitecture) -> tuple[float, float]:
        """(seconds per token, fixed seconds per microbatch) of the whole model as the
        sum of its classes: every layer's attention, its MoE or dense FFN, the head."""
        moe = sum(model.is_moe_layer(i) for i in range(model.num_hidden_layers))
        dense = model.num_hidden_layers - moe
        layers = model.num_hidden_layers
        per_token = (
            layers * self.attention
            + moe * self.expert_ffn
            + dense * self.dense_ffn
            + self.embedding
        )
        fixed = (
            layers * self.attention_fixed
            + moe * self.expert_ffn_fixed
            + dense * self.dense_ffn_fixed
            + self.embedding_fixed
        )
        return per_token, fixed

    def calibrated(self, model: ModelArchitecture) -> OperationSeconds:
        """The classes scaled so that their whole-model sums equal the real step's
        seconds per token and per microbatch (unchanged without a ``step``). Without
        any measured fixed seconds the step's per-microbatch time is spread over the
        layers' attention blocks (every layer has one)."""
        if self.step is None:
            return self
        per_token, fixed = self.class_totals(model)
        token_scale = self.step.per_token / per_token
        update = {
            name: getattr(self, name) * token_scale
            for name in ("attention", "expert_ffn", "dense_ffn", "embedding")
        }
        if fixed > 0:
            fixed_scale = self.step.per_microbatch / fixed
            for name in ("attention", "expert_ffn", "dense_ffn", "embedding"):
                update[f"{name}_fixed"] = getattr(self, f"{name}_fixed") * fixed_scale
        else:
            update["attention_fixed"] = self.step.per_microbatch / model.num_hidden_layers
        return self.model_copy(update=update)


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
    concurrent_cores: float | None = Field(default=None, gt=0)
    """Cores the two processes got between them while alternating compute and an
    all-reduce, as workers do (absent in older profiles). Below the machine's cores
    when other tenants take them: co-located workers then share what is left."""


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
    divided by the measured seconds per token (so predictions reproduce them), after
    calibrating the classes to the real step when one was measured
    (:meth:`OperationSeconds.calibrated`)."""
    a = assumptions or Assumptions()
    if seconds.step is not None:
        per_token, fixed = seconds.class_totals(model)
        source += (
            f"; classes calibrated to a real step: x{seconds.step.per_token / per_token:.2f} "
            f"per token, x{seconds.step.per_microbatch / fixed if fixed else 0:.2f} fixed"
        )
        seconds = seconds.calibrated(model)
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


def worker_cores(profile: DeviceProfile, processes: int) -> float:
    """Cores ``processes`` co-located workers share: the machine's, or fewer when
    the profile measured that concurrent workers got fewer (``concurrent_cores``; a
    single worker is assumed to get a core of its own, as the CPU-time profile did)."""
    measured = profile.communication.concurrent_cores if profile.communication else None
    if processes > 1 and measured is not None:
        return min(float(profile.cores), measured)
    return float(profile.cores)


def _share(profile: DeviceProfile, processes: int, cores: float | None) -> float:
    """Fraction of a core per thread each of ``processes`` workers gets (at most 1)."""
    cores = worker_cores(profile, processes) if cores is None else cores
    return min(1.0, cores / (processes * profile.threads))


def shared_throughput(
    profile: DeviceProfile, processes: int, cores: float | None = None
) -> MeasuredThroughput:
    """What each of ``processes`` workers (as many threads each as the profile used)
    on the profiled machine gets: the profile's speed when they have a core per
    thread, else that speed x cores / (processes x threads). ``cores`` overrides the
    profile's core count, e.g. with the cores other tenants leave free on a shared
    machine (the profile's CPU seconds assume a core of one's own); without it,
    :func:`worker_cores`."""
    cores = worker_cores(profile, processes) if cores is None else cores
    share = _share(profile, processes, cores)
    t = profile.throughput
    note = f"; shared by {processes} processes on {cores:.3g} cores" if share < 1 else ""
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


def step_fixed_seconds(
    profile: DeviceProfile, processes: int = 1, cores: float | None = None
) -> float:
    """Seconds per step every worker spends outside its microbatches beyond the
    optimizer's per-parameter time (gradient norm, statistics, anomaly detector,
    Python bookkeeping): the real step's fixed seconds less the optimizer class over
    its parameters, stretched like :func:`shared_throughput` when ``processes``
    outnumber the cores. 0 for profiles without a measured step."""
    step = profile.seconds.step
    if step is None:
        return 0.0
    remainder = max(0.0, step.per_step - step.parameters * profile.seconds.optimizer)
    return remainder / _share(profile, processes, cores)


def assumptions_with_profile(
    profile: DeviceProfile,
    processes: int = 1,
    cores: float | None = None,
    assumptions: Assumptions | None = None,
) -> Assumptions:
    """``assumptions`` with what the profile measured: collective latencies (see
    :func:`assumptions_with_communication`) and the per-step fixed seconds."""
    a = assumptions or Assumptions()
    if profile.communication is not None:
        a = assumptions_with_communication(profile.communication, a)
    return replace(a, step_fixed_s=step_fixed_seconds(profile, processes, cores))


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
