"""Hand-made plans for runtime tests (the planner is not needed to exercise the trainer).

Every plan puts all ranks on one node of pool ``local``; plan rank order is
(stage, dp_index). Within a stage, consecutive replicas form EP groups of size
``ep`` and split the routed experts evenly.
"""

from __future__ import annotations

from hetmoe_operator.api.model import PRESETS
from hetmoe_operator.api.training import AnomalyPolicy, LearningRateSchedule, TrainingConfig
from hetmoe_operator.plan import ParallelDegrees, Plan, RankPlan, ReplicaPlan, StagePlan


def make_plan(
    *,
    pp: int = 1,
    dp: int = 1,
    ep: int = 1,
    stage_layers: list[int] | None = None,
    replicas: list[tuple[int, int]] | None = None,
    steps: int = 20,
    sequence_length: int = 32,
    seed: int = 1,
    balancing: str = "aux-loss",
    anomaly: AnomalyPolicy | None = None,
    warmup: int = 2,
    virtual_stages: int = 1,
    rank_experts: list[list[int]] | None = None,
    pipeline_shape: str = "loop",
    split_backward: bool = False,
    recompute: bool = False,
) -> Plan:
    """A valid plan of the tiny preset.

    ``stage_layers``: layers per (virtual) stage, ``pp x virtual_stages`` entries
    (default: as even as possible);
    ``replicas``: ``(microbatch_size, num_microbatches)`` per replica (default 2 x 2);
    ``rank_experts``: routed experts per EP rank (default: an even split); an expert
    listed under several EP ranks is a replicated hot expert;
    ``pipeline_shape``: ``"v"`` (with ``virtual_stages=2``) for the zero-bubble V;
    ``split_backward``: with the loop shape, ZB-H1 (v = 1) or ZB1P (v > 1);
    ``recompute``: activation recompute on every stage.
    """
    arch = PRESETS["tiny"]
    layers = arch.num_hidden_layers
    num_stages = pp * virtual_stages
    if stage_layers is None:
        base, extra = divmod(layers, num_stages)
        stage_layers = [base + (1 if s < extra else 0) for s in range(num_stages)]
    assert sum(stage_layers) == layers and len(stage_layers) == num_stages
    stages, start = [], 0
    for index, count in enumerate(stage_layers):
        stages.append(
            StagePlan(
                index=index,
                layer_start=start,
                layer_end=start + count,
                has_embedding=index == 0,
                has_head=index == num_stages - 1,
                recompute_activations=recompute,
            )
        )
        start += count
    replicas = replicas or [(2, 2)] * dp
    replica_plans = [
        ReplicaPlan(dp_index=j, samples_per_step=m * n, microbatch_size=m, num_microbatches=n)
        for j, (m, n) in enumerate(replicas)
    ]
    experts_per_rank = arch.num_experts // ep
    ranks = []
    for stage in range(pp):
        for j in range(dp):
            rank = stage * dp + j
            ep_rank = j % ep
            ranks.append(
                RankPlan(
                    rank=rank,
                    pool="local",
                    grade="cpu",
                    node_slot=0,
                    local_rank=rank,
                    stage=stage,
                    dp_index=j,
                    ep_group=j // ep,
                    ep_rank=ep_rank,
                    experts=list(
                        range(ep_rank * experts_per_rank, (ep_rank + 1) * experts_per_rank)
                    )
                    if rank_experts is None
                    else rank_experts[ep_rank],
                )
            )
    training = TrainingConfig(
        steps=steps,
        global_batch_size=sum(m * n for m, n in replicas),
        sequence_length=sequence_length,
        seed=seed,
        lr=LearningRateSchedule(peak=3e-3, minimum=3e-4, warmup_steps=warmup, decay="cosine"),
        balancing=balancing,  # type: ignore[arg-type]
        routing_warmup_steps=3,
        anomaly=anomaly or AnomalyPolicy(),
    )
    return Plan(
        model=arch,
        training=training,
        parallel=ParallelDegrees(pp=pp, dp=dp, ep=ep),
        stages=stages,
        virtual_stages=virtual_stages,
        pipeline_shape=pipeline_shape,  # type: ignore[arg-type]
        split_backward=split_backward,
        replicas=replica_plans,
        ranks=ranks,
    )
