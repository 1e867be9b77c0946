"""Measured profiles: effective throughput from seconds, sharing cores, applying to grades."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hetmoe_operator.api.job import PlacementSpec
from hetmoe_operator.api.model import PRESETS
from hetmoe_operator.api.training import TrainingConfig
from hetmoe_operator.placement import plan_job
from hetmoe_operator.placement.cost_model import Assumptions, GradeProfile
from hetmoe_operator.placement.layout import Layout, Problem, evaluate
from hetmoe_operator.placement.profile import (
    CommunicationProfile,
    DeviceProfile,
    LinkFit,
    OperationSeconds,
    StepSeconds,
    assumptions_with_communication,
    assumptions_with_profile,
    cluster_with_profiles,
    grade_with_communication,
    shared_throughput,
    step_fixed_seconds,
    throughput_from_seconds,
    worker_cores,
)

from .helpers import local_cluster

TINY = PRESETS["tiny"]
SECONDS = OperationSeconds(
    attention=16e-6, expert_ffn=110e-6, dense_ffn=8e-6, embedding=15e-6, optimizer=40e-9
)


def _profile(threads: int = 1, cores: int = 2) -> DeviceProfile:
    return DeviceProfile(
        device="test cpu",
        threads=threads,
        cores=cores,
        model=TINY,
        sequence_length=64,
        microbatch_size=2,
        repeats=5,
        seconds=SECONDS,
        throughput=throughput_from_seconds(TINY, 64, SECONDS, "test"),
    )


def test_a_profiled_grade_predicts_the_measured_seconds() -> None:
    cluster = cluster_with_profiles(local_cluster(1), {"cpu": _profile().throughput})
    grade = cluster.catalog.grade("cpu")
    profile = GradeProfile(TINY, grade, 64, Assumptions())
    dense, expert = profile.forward_seconds(1, 2)  # layer 1 is a MoE layer
    assert profile.passes * dense == pytest.approx(SECONDS.attention)
    assert profile.passes * expert == pytest.approx(SECONDS.expert_ffn)
    dense0, _ = profile.forward_seconds(0, 1)  # layer 0 is dense
    assert profile.passes * dense0 == pytest.approx(SECONDS.attention + SECONDS.dense_ffn)
    assert profile.head_seconds == pytest.approx(SECONDS.embedding)
    assert profile.optimizer_seconds_per_param == pytest.approx(SECONDS.optimizer)


@pytest.mark.parametrize(
    ("processes", "threads", "share"), [(1, 1, 1.0), (2, 1, 1.0), (4, 1, 0.5), (2, 2, 0.5)]
)
def test_processes_sharing_cores_each_get_a_share(
    processes: int, threads: int, share: float
) -> None:
    profile = _profile(threads=threads, cores=2)
    shared = shared_throughput(profile, processes)
    assert shared.expert_ffn == pytest.approx(profile.throughput.expert_ffn * share)
    assert ("shared by" in shared.source) == (share < 1)


def test_free_cores_override_the_profiled_core_count() -> None:
    profile = _profile(cores=2)
    shared = shared_throughput(profile, 2, cores=1.0)
    assert shared.expert_ffn == pytest.approx(profile.throughput.expert_ffn / 2)
    assert shared.expert_ffn_fixed_seconds == pytest.approx(
        profile.throughput.expert_ffn_fixed_seconds * 2
    )
    assert "on 1 cores" in shared.source


def test_profile_file_round_trips() -> None:
    profile = _profile()
    assert DeviceProfile.model_validate(profile.to_wire()) == profile


def test_unknown_grade_is_named() -> None:
    with pytest.raises(KeyError, match="the catalog knows: cpu"):
        cluster_with_profiles(local_cluster(1), {"gpu": _profile().throughput})


def test_fixed_seconds_per_microbatch_are_charged_and_favour_larger_microbatches() -> None:
    fixed = SECONDS.model_copy(
        update={
            "attention_fixed": 1e-3,
            "expert_ffn_fixed": 2e-3,
            "dense_ffn_fixed": 0.5e-3,
            "embedding_fixed": 1e-3,
        }
    )
    plain = cluster_with_profiles(local_cluster(1), {"cpu": _profile().throughput})
    costly = cluster_with_profiles(
        local_cluster(1), {"cpu": throughput_from_seconds(TINY, 64, fixed, "test")}
    )
    batch = TrainingConfig(steps=1, global_batch_size=16, sequence_length=64)
    layout = Layout(1, 1, (0, 6), (("local",),), 2, (8,), (False,), False)
    step = {
        name: evaluate(Problem(TINY, batch, c, [1.0] * 8), layout).step
        for name, c in (("plain", plain), ("costly", costly))
    }
    per_microbatch = 6 * 1e-3 + 5 * 2e-3 + 1 * 0.5e-3 + 1e-3
    assert step["costly"].compute - step["plain"].compute == pytest.approx(8 * per_microbatch)
    sizes = {
        name: plan_job(TINY, batch, c, PlacementSpec()).replicas[0].microbatch_size
        for name, c in (("plain", plain), ("costly", costly))
    }
    assert sizes["costly"] >= sizes["plain"]


COMMUNICATION = CommunicationProfile(
    backend="gloo",
    processes=2,
    all_reduce=LinkFit(latency_seconds=1e-3, gbps=2.0),
    all_to_all=LinkFit(latency_seconds=0.5e-3, gbps=1.0),
    send_recv=LinkFit(latency_seconds=0.3e-3, gbps=3.0),
)


def test_measured_communication_replaces_latency_and_bandwidth() -> None:
    a = assumptions_with_communication(COMMUNICATION)
    assert a.collective_latency_s == pytest.approx(1e-3)  # the slower collective
    assert a.p2p_latency_s == pytest.approx(0.3e-3)
    grade = grade_with_communication(local_cluster(1).catalog.grade("cpu"), COMMUNICATION)
    assert grade.intra_node_gbps == grade.inter_node_gbps == pytest.approx(2.0)


def test_measured_collective_latency_is_charged_per_collective() -> None:
    """dp2 x ep2 on one pool: per microbatch 5 all-to-alls per MoE layer (5 MoE layers:
    a count exchange, dispatch and combine forward and backward) and a gradient sync
    (reduce-scatter + all-gather) plus the trainer's stats and expert-load all-reduces
    once per step."""
    cluster = cluster_with_profiles(local_cluster(2), {"cpu": _profile().throughput})
    batch = TrainingConfig(steps=1, global_batch_size=16, sequence_length=64)
    layout = Layout(1, 2, (0, 6), (("local",),), 2, (4,), (False,), False)
    loads = [1.0] * 8
    exposed = replace(Assumptions(), overlap_communication=False)  # count every latency
    slow = replace(exposed, collective_latency_s=1e-3)
    fast = replace(exposed, collective_latency_s=0.0)
    step = {
        name: evaluate(Problem(TINY, batch, cluster, loads, a), layout).step
        for name, a in (("slow", slow), ("fast", fast))
    }
    exchanges = 4 * 5 * 5  # microbatches x MoE layers x all-to-alls
    per_step = 2 + 2
    assert step["slow"].total - step["fast"].total == pytest.approx(
        (exchanges + per_step) * 1e-3, rel=0.005
    )


def test_profile_with_communication_round_trips() -> None:
    profile = _profile().model_copy(update={"communication": COMMUNICATION})
    assert DeviceProfile.model_validate(profile.to_wire()) == profile


FIXED = SECONDS.model_copy(
    update={
        "attention_fixed": 1e-3,
        "expert_ffn_fixed": 2e-3,
        "dense_ffn_fixed": 0.5e-3,
        "embedding_fixed": 1e-3,
    }
)
STEP = StepSeconds(per_token=2e-3, per_microbatch=40e-3, per_step=30e-3, parameters=400_000)


def _dp1_step(seconds: OperationSeconds, microbatches: int = 1) -> float:
    """Predicted compute of a one-process step of 16 x 64 tokens in ``microbatches``."""
    cluster = cluster_with_profiles(
        local_cluster(1), {"cpu": throughput_from_seconds(TINY, 64, seconds, "test")}
    )
    batch = TrainingConfig(steps=1, global_batch_size=16, sequence_length=64)
    size = 16 // microbatches
    layout = Layout(1, 1, (0, 6), (("local",),), size, (microbatches,), (False,), False)
    return evaluate(Problem(TINY, batch, cluster, [1.0] * 8), layout).step.compute


@pytest.mark.parametrize("microbatches", [1, 4])
def test_a_measured_step_calibrates_the_classes_to_its_totals(microbatches: int) -> None:
    """The classes timed alone predict 1,024 tokens x their per-token sum + their fixed
    sum; with a real step the prediction is the step's own line, whatever the split."""
    calibrated = FIXED.model_copy(update={"step": STEP})
    tokens = 16 * 64
    assert _dp1_step(calibrated, microbatches) == pytest.approx(
        tokens * STEP.per_token + microbatches * STEP.per_microbatch
    )
    per_token, fixed = FIXED.class_totals(TINY)
    assert _dp1_step(FIXED, microbatches) == pytest.approx(
        tokens * per_token + microbatches * fixed
    )


def test_calibration_keeps_the_split_between_classes() -> None:
    scaled = FIXED.model_copy(update={"step": STEP}).calibrated(TINY)
    assert scaled.class_totals(TINY) == pytest.approx((STEP.per_token, STEP.per_microbatch))
    assert scaled.expert_ffn / scaled.attention == pytest.approx(FIXED.expert_ffn / FIXED.attention)
    assert scaled.embedding_fixed / scaled.attention_fixed == pytest.approx(
        FIXED.embedding_fixed / FIXED.attention_fixed
    )


def test_a_step_without_class_fixed_seconds_spreads_them_over_the_layers() -> None:
    scaled = SECONDS.model_copy(update={"step": STEP}).calibrated(TINY)
    assert scaled.attention_fixed == pytest.approx(STEP.per_microbatch / 6)
    assert scaled.class_totals(TINY)[1] == pytest.approx(STEP.per_microbatch)


def test_profiles_written_before_steps_were_timed_still_load_unchanged() -> None:
    wire = _profile().to_wire()
    assert "step" not in wire["seconds"]
    old = DeviceProfile.model_validate(wire)
    assert old.seconds.step is None
    assert old.seconds.calibrated(TINY) == old.seconds
    assert step_fixed_seconds(old) == 0.0
    assert assumptions_with_profile(old) == Assumptions()


def test_profile_with_a_step_round_trips() -> None:
    seconds = FIXED.model_copy(update={"step": STEP})
    profile = _profile().model_copy(
        update={"seconds": seconds, "throughput": throughput_from_seconds(TINY, 64, seconds, "t")}
    )
    assert DeviceProfile.model_validate(profile.to_wire()) == profile
    assert "calibrated to a real step: x" in profile.throughput.source


def test_step_fixed_seconds_are_the_step_beyond_the_optimizer_and_share_cores() -> None:
    profile = _profile(cores=2).model_copy(
        update={"seconds": FIXED.model_copy(update={"step": STEP})}
    )
    beyond = STEP.per_step - STEP.parameters * FIXED.optimizer  # 30 ms - 16 ms
    assert step_fixed_seconds(profile) == pytest.approx(beyond)
    assert step_fixed_seconds(profile, processes=2) == pytest.approx(beyond)
    assert step_fixed_seconds(profile, processes=4) == pytest.approx(2 * beyond)
    a = assumptions_with_profile(profile.model_copy(update={"communication": COMMUNICATION}))
    assert a.step_fixed_s == pytest.approx(beyond)
    assert a.collective_latency_s == pytest.approx(1e-3)
    cheap = STEP.model_copy(update={"per_step": 1e-3})  # noise below the optimizer class
    profile = profile.model_copy(update={"seconds": FIXED.model_copy(update={"step": cheap})})
    assert step_fixed_seconds(profile) == 0.0


def test_measured_co_scheduling_shares_the_cores_workers_actually_got() -> None:
    """Two workers that got one core between them in the profile: each computes at
    half speed (and so do four, at a quarter); one worker keeps a core of its own."""
    crowded = COMMUNICATION.model_copy(update={"concurrent_cores": 1.0})
    profile = _profile(cores=2).model_copy(
        update={
            "communication": crowded,
            "seconds": FIXED.model_copy(update={"step": STEP}),
        }
    )
    speed = profile.throughput.expert_ffn
    assert worker_cores(profile, 1) == 2.0
    assert worker_cores(profile, 2) == 1.0
    assert shared_throughput(profile, 1).expert_ffn == pytest.approx(speed)
    assert shared_throughput(profile, 2).expert_ffn == pytest.approx(speed / 2)
    assert shared_throughput(profile, 4).expert_ffn == pytest.approx(speed / 4)
    assert shared_throughput(profile, 2, cores=2.0).expert_ffn == pytest.approx(speed)
    assert step_fixed_seconds(profile, 2) == pytest.approx(2 * step_fixed_seconds(profile, 1))
    roomy = profile.model_copy(
        update={"communication": COMMUNICATION.model_copy(update={"concurrent_cores": 3.0})}
    )
    assert worker_cores(roomy, 2) == 2.0  # never more than the machine's cores


def test_profiles_without_co_scheduling_assume_every_core_free() -> None:
    wire = _profile().model_copy(update={"communication": COMMUNICATION}).to_wire()
    assert "concurrentCores" not in wire["communication"]
    old = DeviceProfile.model_validate(wire)
    assert worker_cores(old, 2) == 2.0
