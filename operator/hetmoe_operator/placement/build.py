"""Turn a chosen layout into the versioned Plan the trainer follows.

Seating rule: inside a pool, each EP group's stage blocks are contiguous device
slots, ``ep`` per block, filled node by node from slot 0; plan ranks are then
numbered by (pool in cluster order, node slot, local rank), so the ranks of one node
are contiguous.
"""

from __future__ import annotations

import math

from hetmoe_operator.api.job import PlacementSpec
from hetmoe_operator.placement.bound import ideal_tokens_per_s
from hetmoe_operator.placement.cost_model import GIB
from hetmoe_operator.placement.layout import Evaluation, Layout, Problem, stage_times
from hetmoe_operator.plan import (
    MemoryEstimate,
    ParallelDegrees,
    Plan,
    PoolSummary,
    Prediction,
    RankPlan,
    ReplicaPlan,
    StagePlan,
    StagePrediction,
    StepTimeBreakdown,
)


def _ranges(layers: list[int]) -> str:
    """``[0, 1, 2, 5, 6]`` -> ``"0-2,5-6"``."""
    parts: list[str] = []
    for layer in sorted(set(layers)):
        if parts and int(parts[-1].split("-")[-1]) == layer - 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{layer}"
        else:
            parts.append(str(layer))
    return ",".join(parts)


def describe_inputs(problem: Problem, layout: Layout) -> list[str]:
    """The catalog figures and model constants behind a prediction."""
    catalog = problem.cluster.catalog
    lines = []
    for grade_name in sorted({problem.pools[p].grade.name for p in layout.devices_per_pool()}):
        grade = catalog.grade(grade_name)
        e = grade.efficiency
        m = grade.measured
        speed = (
            f"measured effective TFLOPS attention {m.attention:.4g} / expert {m.expert_ffn:.4g} "
            f"/ dense {m.dense_ffn:.4g} / embedding {m.embedding:.4g} / optimizer "
            f"{m.optimizer:.4g} ({m.source or 'hetmoe profile'})"
            if m is not None
            else f"{grade.peak_bf16_tflops:g} TFLOPS peak bf16 x efficiency "
            f"attention {e.attention:g} / expert {e.expert_ffn:g} / dense {e.dense_ffn:g} / "
            f"embedding {e.embedding:g} / optimizer {e.optimizer:g}"
        )
        lines.append(
            f"grade {grade.name}: {speed}; {grade.memory_gib:g} GiB; "
            f"{grade.intra_node_gbps:g} GB/s intra-node, {grade.inter_node_gbps:g} GB/s "
            f"inter-node; {grade.price_per_hour:g} {catalog.currency}/h"
        )
    lines.append(f"cross-pool bandwidth {catalog.cross_pool_gbps:g} GB/s per device")
    placement = problem.placement(layout.ep, layout.redundant_experts)
    lines.append(
        f"expert placement per EP group of {layout.ep}: "
        f"{max(len(x) for x in placement.experts)} slots per rank, "
        f"{placement.redundant_slots} redundant, expected load imbalance "
        f"{placement.imbalance:.3f} (max/mean)"
    )
    assumptions = problem.assumptions.describe()
    if layout.shape == "v":
        lines.append(
            "pipeline schedule: zero-bubble V (ZB-V, Qi et al. 2024; torch "
            "ScheduleZBVZeroBubble): position r holds stages r and 2 pp - 1 - r (position 0 "
            "the embedding and the LM head); backward split into input gradient (B) and "
            "weight gradient (W); the step time is simulated in torch's action order"
        )
        lines.append(
            f"ZB-V work split: F = 1 forward, W = {problem.assumptions.backward_factor / 2:g} "
            "forwards of the weighted matmuls (the attention core has no weight gradient), "
            "B = the rest of the backward plus any recomputation (matmul-dominated: "
            "W ~ B ~ F in FLOPs); exposed all-to-all in F and B, none in W"
        )
        lines.append(
            "ZB-V memory: activations of every chunk-microbatch alive from its F to its W, "
            "replayed in torch's order; a microbatch whose W is deferred also holds the "
            "gradients of its weighted matmuls' outputs (and its recomputed activations)"
        )
        assumptions = [line for line in assumptions if not line.startswith("1F1B schedule:")]
    elif layout.split_backward:
        name = "ZB-H1" if layout.virtual == 1 else f"ZB1P with {layout.virtual} chunks"
        lines.append(
            f"pipeline schedule: {name} (Qi et al. 2024; torch ScheduleInterleavedZeroBubble): "
            "1F1B's order with the backward split into input gradient (B) and weight "
            "gradient (W); position r defers r W's into its drain; the step time is "
            "simulated in torch's action order"
        )
        lines.append(
            f"{name} work split: F = 1 forward, W = {problem.assumptions.backward_factor / 2:g} "
            "forwards of the weighted matmuls, B = the rest of the backward plus any "
            "recomputation; exposed all-to-all in F and B, none in W"
        )
        lines.append(
            f"{name} memory: activations alive from F to W, replayed in torch's order: "
            "position r keeps about pp - r microbatches before B and r with a deferred W "
            "(those also hold their weighted matmuls' output gradients), so about pp "
            "microbatches on every position, not 1F1B's pp - r"
        )
        assumptions = [line for line in assumptions if not line.startswith("1F1B schedule:")]
    elif layout.virtual > 1:
        lines.append(
            f"pipeline schedule: interleaved 1F1B, {layout.virtual} chunks (virtual stages) "
            f"per position: fill/drain {1 / layout.virtual:g}x of 1F1B's, {layout.virtual} "
            "stage-to-stage transfers per microbatch and position (the last position "
            f"{layout.virtual - 1}, back to the first); position r keeps min((v - 1) pp + "
            "2 (pp - 1 - r) + 1, v x microbatches) chunk-microbatches in flight"
        )
        # That replaces the 1F1B in-flight rule the general assumptions state.
        assumptions = [line for line in assumptions if not line.startswith("1F1B schedule:")]
    elif layout.pp > 1:
        lines.append("pipeline schedule: 1F1B")
    return lines + assumptions


def build_plan(
    problem: Problem,
    layout: Layout,
    evaluation: Evaluation,
    placement: PlacementSpec,
    job_name: str,
) -> Plan:
    """The Plan for ``layout`` with its prediction."""
    ep, pp = layout.ep, layout.pp
    order = {name: i for i, name in enumerate(problem.pools)}
    cursor: dict[str, int] = {}
    seats = []  # (pool order, node slot, local rank, pool, group, stage, ep rank)
    for group, template in enumerate(layout.groups):
        for stage, pool in enumerate(template):
            per_node = problem.pools[pool].pool.devices_per_node
            start = cursor.get(pool, 0)
            cursor[pool] = start + ep
            for ep_rank in range(ep):
                slot = start + ep_rank
                seats.append(
                    (order[pool], slot // per_node, slot % per_node, pool, group, stage, ep_rank)
                )
    seats.sort()
    expert_sets = problem.placement(ep, layout.redundant_experts).experts
    memory = problem.memory
    ranks = []
    chunks = layout.chunks()
    positions = problem.position_chunks(layout)
    for rank, (_, node_slot, local_rank, pool, group, stage, ep_rank) in enumerate(seats):
        has_moe = any(
            memory.moe_layers[end] > memory.moe_layers[start] for start, end in positions[stage]
        )
        ranks.append(
            RankPlan(
                rank=rank,
                pool=pool,
                grade=problem.pools[pool].grade.name,
                node_slot=node_slot,
                local_rank=local_rank,
                stage=stage,
                dp_index=group * ep + ep_rank,
                ep_group=group,
                ep_rank=ep_rank,
                experts=list(expert_sets[ep_rank]) if has_moe else [],
            )
        )
    stages = [
        StagePlan(
            index=s,
            layer_start=start,
            layer_end=end,
            has_embedding=s == 0,
            has_head=s == len(chunks) - 1,
            recompute_activations=layout.recompute[
                2 * pp - 1 - s if layout.shape == "v" and s >= pp else s % pp
            ],
        )
        for s, (start, end) in enumerate(chunks)
    ]
    replicas = [
        ReplicaPlan(
            dp_index=group * ep + j,
            samples_per_step=layout.microbatch_size * count,
            microbatch_size=layout.microbatch_size,
            num_microbatches=count,
        )
        for group, count in enumerate(layout.microbatches)
        for j in range(ep)
    ]
    step = evaluation.step
    seq = problem.training.sequence_length
    summaries = []
    for pool, devices in sorted(layout.devices_per_pool().items(), key=lambda kv: order[kv[0]]):
        info = problem.pools[pool]
        pool_ranks = [r for r in ranks if r.pool == pool]
        pool_stages = sorted({r.stage for r in pool_ranks})
        flow = (
            sum(
                ep * layout.microbatch_size * count * seq * template.count(pool) / pp
                for template, count in zip(layout.groups, layout.microbatches, strict=True)
            )
            / step.total
        )
        summaries.append(
            PoolSummary(
                pool=pool,
                grade=info.grade.name,
                nodes=math.ceil(devices / info.pool.devices_per_node),
                devices=devices,
                stages=pool_stages,
                layers=_ranges(
                    [x for s in pool_stages for a, b in positions[s] for x in range(a, b)]
                ),
                experts_per_device=sum(len(r.experts) for r in pool_ranks) / len(pool_ranks),
                predicted_tokens_per_s=flow,
                cost_per_hour=devices * info.grade.price_per_hour,
            )
        )
    ideal = ideal_tokens_per_s(problem, layout.devices_per_pool())
    prediction = Prediction(
        step_time=StepTimeBreakdown(
            compute=step.compute,
            bubble=step.bubble,
            communication=step.communication,
            imbalance=step.imbalance,
            optimizer=step.optimizer,
            total=step.total,
        ),
        tokens_per_s=evaluation.tokens_per_s,
        cost_per_hour=evaluation.cost_per_hour,
        cost_per_1t_tokens=evaluation.cost_per_1t_tokens,
        ideal_tokens_per_s=ideal,
        fraction_of_ideal=evaluation.tokens_per_s / ideal,
        memory=[
            MemoryEstimate(
                pool=check.pool,
                stage=check.stage,
                weights_gib=check.usage.weights / GIB,
                gradients_gib=check.usage.gradients / GIB,
                optimizer_gib=check.usage.optimizer / GIB,
                activations_gib=check.usage.activations / GIB,
                total_gib=check.usage.total / GIB,
                capacity_gib=check.capacity_bytes / GIB,
            )
            for check in evaluation.memory
        ],
        assumptions=describe_inputs(problem, layout),
        stages=[
            StagePrediction(
                stage=t.stage,
                pool=t.pool,
                grade=problem.pools[t.pool].grade.name,
                replicas=[g * ep + j for g in t.groups for j in range(ep)],
                microbatches=t.microbatches,
                microbatch_seconds=t.microbatch_seconds,
                busy_seconds=t.busy_seconds,
                step_seconds=t.step_seconds,
            )
            for t in stage_times(problem, layout)
        ],
    )
    return Plan(
        job=job_name,
        objective=placement.objective,
        currency=problem.cluster.catalog.currency,
        model=problem.model,
        training=problem.training,
        parallel=ParallelDegrees(pp=pp, dp=layout.dp, ep=ep, tp=1),
        stages=stages,
        virtual_stages=layout.virtual,
        pipeline_shape=layout.shape,
        split_backward=layout.zero_bubble,
        replicas=replicas,
        ranks=ranks,
        pools=summaries,
        prediction=prediction,
    )
