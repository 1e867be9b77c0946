"""Builders and plan invariants shared by the placement tests."""

from __future__ import annotations

from collections import defaultdict

from hetmoe_operator.api.catalog import DeviceCatalog, DeviceGrade
from hetmoe_operator.api.cluster import ClusterDescription, NodePool
from hetmoe_operator.api.job import PlacementSpec
from hetmoe_operator.api.model import ModelArchitecture
from hetmoe_operator.api.training import TrainingConfig
from hetmoe_operator.placement.build import build_plan
from hetmoe_operator.placement.cost_model import Assumptions
from hetmoe_operator.placement.planner import make_problem
from hetmoe_operator.placement.search import Searcher
from hetmoe_operator.plan import Plan


def grade(name: str, tflops: float, memory: float, price: float, **extra: object) -> DeviceGrade:
    return DeviceGrade(
        name=name, peak_bf16_tflops=tflops, memory_gib=memory, price_per_hour=price, **extra
    )


def cluster(
    grades: list[DeviceGrade], pools: list[tuple[str, str, int, int]]
) -> ClusterDescription:
    """``pools``: (name, grade, nodes, devices per node)."""
    return ClusterDescription(
        catalog=DeviceCatalog(grades=grades),
        pools=[NodePool(name=n, grade=g, nodes=k, devices_per_node=d) for n, g, k, d in pools],
    )


def local_cluster(devices: int = 4, memory: float = 8.0) -> ClusterDescription:
    return cluster([grade("cpu", 0.2, memory, 0.0)], [("local", "cpu", 1, devices)])


def training(batch: int = 8, seq: int = 128) -> TrainingConfig:
    return TrainingConfig(steps=10, global_batch_size=batch, sequence_length=seq)


def small_model(layers: int = 4, experts: int = 8, dense: int = 1) -> ModelArchitecture:
    return ModelArchitecture(
        num_hidden_layers=layers,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=experts,
        num_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        intermediate_size=128,
        first_k_dense_replace=dense,
        vocab_size=512,
    )


def check_plan(plan: Plan, cluster_description: ClusterDescription) -> None:
    """Every invariant the trainer relies on (beyond Plan's own validator)."""
    pools = {p.name: p for p in cluster_description.pools}
    degrees = plan.parallel
    assert degrees.tp == 1
    for replica in plan.replicas:  # torch's 1F1B refuses fewer microbatches than stages
        assert replica.num_microbatches >= degrees.pp, replica
        if plan.virtual_stages > 1 and plan.pipeline_shape == "loop":
            # interleaved 1F1B runs whole rounds of pp
            assert degrees.pp > 1 and replica.num_microbatches % degrees.pp == 0, replica
    if plan.pipeline_shape == "v":  # ZB-V: stages r and 2 pp - 1 - r on position r
        assert plan.virtual_stages == 2 and degrees.pp > 1
        for index in range(2 * degrees.pp):
            assert plan.stages[index] in plan.stages_at(plan.position_of(index))
        assert plan.stages_at(0)[0].has_embedding and plan.stages_at(0)[1].has_head
    assert len(plan.stages) == degrees.pp * plan.virtual_stages
    for position in range(degrees.pp):
        assert len(plan.stages_at(position)) == plan.virtual_stages
        assert all(chunk.layers for chunk in plan.stages_at(position)) or plan.virtual_stages == 1
    by_node: dict[tuple[str, int], list[int]] = defaultdict(list)
    for rank in plan.ranks:
        pool = pools[rank.pool]
        assert rank.grade == pool.grade
        assert rank.local_rank < pool.devices_per_node
        by_node[(rank.pool, rank.node_slot)].append(rank.rank)
    for ranks in by_node.values():
        assert ranks == list(range(ranks[0], ranks[0] + len(ranks))), "node ranks not contiguous"
    for name in {r.pool for r in plan.ranks}:
        slots = sorted({slot for pool, slot in by_node if pool == name})
        assert slots == list(range(len(slots)))
        assert len(slots) <= pools[name].nodes
    seats = {(r.stage, r.dp_index) for r in plan.ranks}
    assert len(seats) == len(plan.ranks) == degrees.pp * degrees.dp
    groups: dict[tuple[int, int], list] = defaultdict(list)
    for rank in plan.ranks:
        groups[(rank.stage, rank.ep_group)].append(rank)
    model = plan.model
    microbatches = {r.dp_index: r.num_microbatches for r in plan.replicas}
    for (stage, _), members in groups.items():
        assert len(members) == degrees.ep
        assert sorted(r.ep_rank for r in members) == list(range(degrees.ep))
        assert len({r.pool for r in members}) == 1, "EP group crosses pools"
        assert len({microbatches[r.dp_index] for r in members}) == 1
        layers = [layer for chunk in plan.stages_at(stage) for layer in chunk.layers]
        if any(model.is_moe_layer(layer) for layer in layers):
            hosted = set()
            for r in members:
                assert r.experts == sorted(set(r.experts))
                hosted.update(r.experts)
            assert hosted == set(range(model.num_experts)), "an expert is not hosted"
        else:
            assert all(r.experts == [] for r in members)
    for stage in plan.stages:  # identical stage layers for every replica by construction
        assert stage.layer_start <= stage.layer_end
    assert plan.prediction is not None
    headroom = Assumptions().memory_headroom
    for estimate in plan.prediction.memory:
        assert estimate.total_gib <= estimate.capacity_gib * (1 - headroom) + 1e-9
    step = plan.prediction.step_time
    parts = step.compute + step.bubble + step.communication + step.imbalance + step.optimizer
    assert abs(parts - step.total) <= 1e-9 * step.total
    assert plan.prediction.fraction_of_ideal <= 1 + 1e-9, "the ideal bound must bound the plan"
    for entry in plan.prediction.stages:
        assert entry.step_seconds <= step.total * (1 + 1e-9)
        assert entry.busy_seconds <= entry.step_seconds * (1 + 1e-9)
    assert {e.stage for e in plan.prediction.stages} == set(range(degrees.pp))
    replicas = sorted(i for e in plan.prediction.stages if e.stage == 0 for i in e.replicas)
    assert replicas == list(range(degrees.dp))
    assert Plan.from_json(plan.to_json()) == plan


def plan_without_zero_bubble(
    model: ModelArchitecture,
    training_config: TrainingConfig,
    description: ClusterDescription,
    placement: PlacementSpec,
) -> Plan:
    """``plan_job`` with ZB-V left out of the search (1F1B and interleaved 1F1B only)."""
    problem = make_problem(model, training_config, description)
    searcher = Searcher(problem, placement, zero_bubble=False)
    searcher.run(float("inf"))
    assert searcher.best is not None
    best = searcher.best
    return build_plan(problem, best.layout, best.evaluation, placement, "local")
