"""Planner benchmark: optimality, baselines, ideal bound, planning time, expert balance.

Run from the repository root:

    .venv/bin/python bench/planner/bench_planner.py [--instances 200] [--repeats 3]
        [--json bench/planner/results.json]

Prints one table per item and a JSON document with every figure. Items follow
issue 4's "Benchmark" section (1b: mixed-grade pipelines vs one pool per replica);
item 6 (predicted vs measured CPU step time) is bench_accuracy.py, which runs the trainer.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from hetmoe_operator.api.catalog import DeviceCatalog, DeviceGrade
from hetmoe_operator.api.cluster import ClusterDescription, NodePool
from hetmoe_operator.api.job import PlacementSpec
from hetmoe_operator.api.manifests import load_catalog
from hetmoe_operator.api.model import PRESETS, ModelArchitecture
from hetmoe_operator.api.training import TrainingConfig
from hetmoe_operator.placement import PlanningError, compare_baselines, plan_job
from hetmoe_operator.placement.experts import balanced_placement
from hetmoe_operator.placement.planner import make_problem

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exhaustive import exhaustive_best

REPO = Path(__file__).resolve().parents[2]
CATALOG = load_catalog(REPO / "examples/catalogs/reference-5-grades.yaml")


def table(title: str, headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print(f"\n## {title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# -- 1. optimality ---------------------------------------------------------------


def random_instance(
    rng: random.Random,
) -> tuple[ModelArchitecture, TrainingConfig, ClusterDescription]:
    layers = rng.randint(2, 4)
    model = ModelArchitecture(
        num_hidden_layers=layers,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=rng.choice([4, 8]),
        num_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=rng.choice([32, 128]),
        intermediate_size=128,
        first_k_dense_replace=rng.randint(0, 1),
        vocab_size=rng.choice([512, 4096]),
    )
    count = rng.randint(2, 3)
    grades = [
        DeviceGrade(
            name=f"g{i}",
            peak_bf16_tflops=rng.choice([0.5, 1.0, 2.0, 4.0]),
            memory_gib=8,
            price_per_hour=rng.choice([1.0, 2.0]),
            intra_node_gbps=rng.choice([10.0, 100.0]),
            inter_node_gbps=rng.choice([1.0, 10.0]),
        )
        for i in range(count)
    ]
    pools = [
        NodePool(
            name=f"p{i}",
            grade=g.name,
            nodes=rng.randint(1, 2),
            devices_per_node=rng.choice([1, 2, 4]),
        )
        for i, g in enumerate(grades)
    ]
    cluster = ClusterDescription(
        catalog=DeviceCatalog(grades=grades, cross_pool_gbps=1.0), pools=pools
    )
    training = TrainingConfig(
        steps=1, global_batch_size=rng.choice([4, 8]), sequence_length=rng.choice([128, 512])
    )
    return model, training, cluster


def optimality(instances: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    ratios: list[float] = []
    any_count: list[float] = []
    interleaved = 0
    zero_bubble = 0
    zb1p = 0
    skipped = 0
    started = time.monotonic()
    while len(ratios) < instances:
        model, training, cluster = random_instance(rng)
        problem = make_problem(model, training, cluster)
        best = exhaustive_best(problem, max_groups=8)
        if best is None:
            skipped += 1
            continue
        plan = plan_job(model, training, cluster, PlacementSpec())
        assert plan.prediction is not None
        ratios.append(plan.prediction.step_time.total / best[0].step.total)
        interleaved += best[1].virtual > 1 and not best[1].zero_bubble
        zero_bubble += best[1].shape == "v"
        zb1p += best[1].split_backward
        # The same question when a plan may also leave devices the batch could feed idle.
        free = exhaustive_best(problem, max_groups=8, every_group_count=True)
        assert free is not None
        any_count.append(plan.prediction.step_time.total / free[0].step.total)
    result = {
        "instances": len(ratios),
        "skipped_infeasible": skipped,
        "mean_ratio": statistics.fmean(ratios),
        "p95_ratio": percentile(ratios, 0.95),
        "max_ratio": max(ratios),
        "optimal_fraction": sum(r <= 1 + 1e-9 for r in ratios) / len(ratios),
        "optimum_interleaved": interleaved,
        "optimum_zero_bubble": zero_bubble,
        "optimum_zb1p": zb1p,
        "any_group_count": {
            "mean_ratio": statistics.fmean(any_count),
            "p95_ratio": percentile(any_count, 0.95),
            "max_ratio": max(any_count),
            "optimal_fraction": sum(r <= 1 + 1e-9 for r in any_count) / len(any_count),
        },
        "seconds": time.monotonic() - started,
    }
    table(
        "1. optimality vs exhaustive search (predicted step time / optimum)",
        ["exhaustive space", "instances", "mean", "p95", "max", "exactly optimal", "target"],
        [
            [
                f"planner's group rule ({interleaved} optima interleave, {zero_bubble} ZB-V, "
                f"{zb1p} ZB-H1/ZB1P)",
                result["instances"],
                f"{result['mean_ratio']:.4f}",
                f"{result['p95_ratio']:.4f}",
                f"{result['max_ratio']:.4f}",
                f"{result['optimal_fraction']:.0%}",
                "mean <= 1.02, p95 <= 1.05",
            ],
            [
                "also fewer groups (idle devices)",
                result["instances"],
                f"{result['any_group_count']['mean_ratio']:.4f}",
                f"{result['any_group_count']['p95_ratio']:.4f}",
                f"{result['any_group_count']['max_ratio']:.4f}",
                f"{result['any_group_count']['optimal_fraction']:.0%}",
                "(for reference)",
            ],
        ],
    )
    return result


# -- 2 and 3. baselines and the ideal bound on the standard suite -----------------


def reference_cluster(pools: dict[str, int]) -> ClusterDescription:
    return ClusterDescription(
        catalog=CATALOG,
        pools=[
            NodePool(name=f"grade-{g.lower()}", grade=g, nodes=n, devices_per_node=8)
            for g, n in pools.items()
        ],
    )


def standard_suite() -> list[tuple[str, ModelArchitecture, TrainingConfig, ClusterDescription]]:
    lite = PRESETS["ling-lite"]
    plus = PRESETS["ling-plus"]
    return [
        (
            "ling-lite A+D 8+8 nodes",
            lite,
            TrainingConfig(steps=1, global_batch_size=1024, sequence_length=4096),
            reference_cluster({"A": 8, "D": 8}),
        ),
        (
            "ling-lite B+E+D 8+8+4",
            lite,
            TrainingConfig(steps=1, global_batch_size=1024, sequence_length=4096),
            reference_cluster({"B": 8, "E": 8, "D": 4}),
        ),
        (
            "ling-lite A+B+C+D+E 4 each",
            lite,
            TrainingConfig(steps=1, global_batch_size=1024, sequence_length=4096),
            reference_cluster({g: 4 for g in "ABCDE"}),
        ),
        (
            "ling-lite reference-mix",
            lite,
            TrainingConfig(steps=1, global_batch_size=4096, sequence_length=4096),
            reference_cluster({"A": 64, "B": 32, "C": 16, "E": 32, "D": 64}),
        ),
        (
            "ling-plus A+D 32+32",
            plus,
            TrainingConfig(steps=1, global_batch_size=4096, sequence_length=4096),
            reference_cluster({"A": 32, "D": 32}),
        ),
        (
            "ling-plus reference-mix",
            plus,
            TrainingConfig(steps=1, global_batch_size=4096, sequence_length=4096),
            reference_cluster({"A": 64, "B": 32, "C": 16, "E": 32, "D": 64}),
        ),
    ]


def suite() -> dict[str, Any]:
    rows = []
    records = []
    spec = PlacementSpec(time_limit_seconds=120)
    for name, model, training, cluster in standard_suite():
        comparison = compare_baselines(model, training, cluster, spec)
        prediction = comparison.plan.prediction
        assert prediction is not None
        step = prediction.step_time
        even = comparison.even_split.tokens_per_s
        single = comparison.best_single_grade
        record = {
            "instance": name,
            "tokens_per_s": prediction.tokens_per_s,
            "even_split_tokens_per_s": even,
            "vs_even_split": prediction.tokens_per_s / even if even else None,
            "best_single_grade": single.name if single else None,
            "vs_best_single_grade": (
                prediction.tokens_per_s / single.tokens_per_s
                if single and single.tokens_per_s
                else None
            ),
            "fraction_of_ideal": prediction.fraction_of_ideal,
            # Why a plan misses the bound: the share of its step that is 1F1B fill and
            # drain, and the fraction it would reach if that bubble were free.
            "bubble_share": step.bubble / step.total,
            "fraction_without_bubble": (
                prediction.fraction_of_ideal * step.total / (step.total - step.bubble)
            ),
            "grades_used": sorted({r.grade for r in comparison.plan.ranks}),
            "degrees": comparison.plan.parallel.model_dump(),
            "virtual_stages": comparison.plan.virtual_stages,
            "pipeline_shape": comparison.plan.pipeline_shape,
            "split_backward": comparison.plan.split_backward,
        }
        records.append(record)
        rows.append(
            [
                name,
                f"{prediction.tokens_per_s:,.0f}",
                f"{record['vs_even_split']:.2f}x" if record["vs_even_split"] else "n/a",
                f"{record['vs_best_single_grade']:.3f}x ({record['best_single_grade']})"
                if record["vs_best_single_grade"]
                else "n/a",
                f"{prediction.fraction_of_ideal:.3f}",
                f"{record['bubble_share']:.3f}",
                f"{record['fraction_without_bubble']:.3f}",
                ",".join(record["grades_used"]),
                _degrees(comparison.plan),
            ]
        )
    evens = [r["vs_even_split"] for r in records if r["vs_even_split"]]
    singles = [r["vs_best_single_grade"] for r in records if r["vs_best_single_grade"]]
    ideal = [r["fraction_of_ideal"] for r in records]
    summary = {
        "mean_vs_even_split": statistics.fmean(evens),
        "min_vs_best_single_grade": min(singles),
        "mean_fraction_of_ideal": statistics.fmean(ideal),
        "mean_fraction_without_bubble": statistics.fmean(
            r["fraction_without_bubble"] for r in records
        ),
    }
    rows.append(
        [
            "MEAN / MIN",
            "",
            f"{summary['mean_vs_even_split']:.2f}x (target >= 1.3)",
            f"min {summary['min_vs_best_single_grade']:.3f}x (target >= 1)",
            f"{summary['mean_fraction_of_ideal']:.3f} (target >= 0.90)",
            "",
            f"{summary['mean_fraction_without_bubble']:.3f}",
            "",
            "",
        ]
    )
    table(
        "2-3. standard suite (throughput objective)",
        [
            "instance",
            "tokens/s",
            "vs even split",
            "vs best single grade",
            "plan/ideal",
            "bubble share",
            "plan/ideal without bubble",
            "grades",
            "degrees (v: chunks per position)",
        ],
        rows,
    )
    return {"instances": records, **summary}


def _degrees(plan: Any) -> str:
    p = plan.parallel
    if plan.pipeline_shape == "v":
        schedule = " ZB-V"
    elif plan.split_backward:
        schedule = " ZB-H1" if plan.virtual_stages == 1 else " ZB1P"
    else:
        schedule = ""
    return f"pp{p.pp} dp{p.dp} ep{p.ep} v{plan.virtual_stages}{schedule}"


# -- mixed-grade pipelines -----------------------------------------------------------


def _mixed_cases() -> list[tuple[str, ModelArchitecture, TrainingConfig, ClusterDescription]]:
    small = ModelArchitecture(
        num_hidden_layers=8,
        hidden_size=1024,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_experts=8,
        num_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=1024,
        intermediate_size=4096,
        first_k_dense_replace=1,
        vocab_size=32000,
    )

    def two(memory_fast: float, nodes: int) -> ClusterDescription:
        grades = [
            DeviceGrade(name="fast", peak_bf16_tflops=40, memory_gib=memory_fast, price_per_hour=1),
            DeviceGrade(name="slow", peak_bf16_tflops=10, memory_gib=16, price_per_hour=1),
        ]
        return ClusterDescription(
            catalog=DeviceCatalog(grades=grades),
            pools=[
                NodePool(name="f", grade="fast", nodes=nodes, devices_per_node=2),
                NodePool(name="s", grade="slow", nodes=nodes, devices_per_node=2),
            ],
        )

    batch = TrainingConfig(steps=1, global_batch_size=32, sequence_length=512)
    suite = {
        name: (model, training, cluster) for name, model, training, cluster in standard_suite()
    }
    return [
        ("0.3B, fast 4 GiB + slow 16 GiB, 2+2 devices", small, batch, two(4, 1)),
        ("0.3B, fast 4 GiB + slow 16 GiB, 4+4 devices", small, batch, two(4, 2)),
        ("0.3B, fast 16 GiB + slow 16 GiB, 2+2 devices", small, batch, two(16, 1)),
        *[
            (name, *suite[name])
            for name in (
                "ling-plus A+D 32+32",
                "ling-plus reference-mix",
                "ling-lite A+D 8+8 nodes",
            )
        ],
    ]


def _kinds(plan: Any) -> str:
    grades: dict[int, dict[int, str]] = {}
    for rank in plan.ranks:
        grades.setdefault(rank.dp_index, {})[rank.stage] = rank.grade
    kinds = {tuple(g[s] for s in sorted(g)) for g in grades.values()}
    return " | ".join(
        sorted(",".join(f"{n}x{k.count(n)}" for n in dict.fromkeys(k)) for k in kinds)
    )


def mixed_pipelines() -> dict[str, Any]:
    """Throughput with mixed-grade pipelines allowed vs every replica on one pool."""
    spec = PlacementSpec(time_limit_seconds=120)
    rows, results = [], {}
    for name, model, training, cluster in _mixed_cases():
        found = {}
        for allowed in (True, False):
            try:
                found[allowed] = plan_job(model, training, cluster, spec, mixed_pipelines=allowed)
            except PlanningError as error:
                found[allowed] = error
        mixed, homogeneous = found[True], found[False]
        tps = mixed.prediction.tokens_per_s if not isinstance(mixed, PlanningError) else None
        base = (
            homogeneous.prediction.tokens_per_s
            if not isinstance(homogeneous, PlanningError)
            else None
        )
        results[name] = {
            "tokens_per_s": tps,
            "homogeneous_tokens_per_s": base,
            "gain": tps / base if tps and base else None,
            "stage_grades": _kinds(mixed) if tps else str(mixed),
            "homogeneous_error": str(homogeneous) if base is None else None,
        }
        rows.append(
            [
                name,
                f"{tps:,.0f}" if tps else "infeasible",
                f"{base:,.0f}" if base else f"infeasible ({homogeneous.constraint})",
                f"{tps / base:.3f}x" if tps and base else ("only mixed fits" if tps else "-"),
                results[name]["stage_grades"],
            ]
        )
    table(
        "1b. mixed-grade pipelines (stages of one replica on two grades)",
        ["instance", "tokens/s", "one pool per replica", "gain", "stage grades per replica"],
        rows,
    )
    return results


# -- 4. planning time ----------------------------------------------------------------


def timed(call: Any, repeats: int) -> dict[str, float]:
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        call()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"median_wall_s": statistics.median(walls), "median_cpu_s": statistics.median(cpus)}


def planning_time(repeats: int) -> dict[str, Any]:
    plus = PRESETS["ling-plus"]
    lite = PRESETS["ling-lite"]
    big_training = TrainingConfig(steps=1, global_batch_size=8192, sequence_length=4096)
    big = {"A": 400, "B": 200, "C": 150, "D": 150, "E": 124}  # 1,024 nodes, 8,192 devices
    lost = dict(big, A=399)
    spec = PlacementSpec(time_limit_seconds=600)
    before = plan_job(plus, big_training, reference_cluster(big), spec)
    cases = [
        (
            "64 devices (ling-lite, A+D 4+4 nodes)",
            "<= 1 s",
            lambda: plan_job(
                lite,
                TrainingConfig(steps=1, global_batch_size=512, sequence_length=4096),
                reference_cluster({"A": 4, "D": 4}),
                spec,
            ),
        ),
        (
            "1,024 nodes x 5 grades (ling-plus)",
            "<= 5 s",
            lambda: plan_job(plus, big_training, reference_cluster(big), spec),
        ),
        (
            "re-plan after losing one node (previous plan given)",
            "<= 2 s",
            lambda: plan_job(plus, big_training, reference_cluster(lost), spec, previous=before),
        ),
        (
            "re-plan after losing one node, from scratch",
            "(for reference)",
            lambda: plan_job(plus, big_training, reference_cluster(lost), spec),
        ),
    ]
    results = {}
    rows = []
    for name, target, call in cases:
        measured = timed(call, repeats)
        results[name] = {**measured, "target": target}
        rows.append(
            [name, f"{measured['median_wall_s']:.2f}", f"{measured['median_cpu_s']:.2f}", target]
        )
    table(f"4. planning time (median of {repeats})", ["case", "wall s", "cpu s", "target"], rows)
    return results


# -- 5. expert placement -------------------------------------------------------------


def replication_bound(loads: list[float], speeds: list[float], extra: int) -> float:
    """No placement with ``extra`` copies beats the hottest expert's per-copy load on
    the fastest device (copies given greedily to the largest load per copy, which
    minimises that maximum)."""
    copies = [1] * len(loads)
    for _ in range(extra):
        hottest = max(range(len(loads)), key=lambda i: loads[i] / copies[i])
        copies[hottest] += 1
    ideal = sum(loads) / sum(speeds)
    per_copy = max(load / c for load, c in zip(loads, copies, strict=True))
    return max(1.0, per_copy / max(speeds) / ideal)


def expert_balance() -> dict[str, Any]:
    loads = [1.0 / (i + 1) ** 0.8 for i in range(64)]
    a, d = CATALOG.grade("A"), CATALOG.grade("D")
    e = CATALOG.grade("E")
    cases = {
        "one grade, 8 devices": [1.0] * 8,
        "one grade, 16 devices": [1.0] * 16,
        "one grade, 32 devices": [1.0] * 32,
        "A+D, 4+4 devices": [a.effective_tflops("expert_ffn")] * 4
        + [d.effective_tflops("expert_ffn")] * 4,
        "A+E+D, 3+3+2 devices": [a.effective_tflops("expert_ffn")] * 3
        + [e.effective_tflops("expert_ffn")] * 3
        + [d.effective_tflops("expert_ffn")] * 2,
    }
    results = {}
    rows = []
    for name, speeds in cases.items():
        placement = balanced_placement(loads, speeds, max_redundant=8, tolerance=0.0)
        mixed = len(set(speeds)) > 1
        ratio = placement.imbalance
        bound = replication_bound(loads, speeds, extra=8)
        results[name] = {
            "imbalance": ratio,
            "redundant_slots": placement.redundant_slots,
            "redundant_fraction": placement.redundant_slots / 64,
            "lower_bound": bound,
        }
        target = "max(load/speed)/ideal <= 1.05" if mixed else "max/mean <= 1.15"
        rows.append(
            [
                name,
                f"{ratio:.3f}",
                f"{bound:.3f}",
                f"{placement.redundant_slots} ({placement.redundant_slots / 64:.1%})",
                target,
            ]
        )
    table(
        "5. expert placement, Zipf(0.8) over 64 experts (<= 8 redundant slots = 12.5%)",
        ["devices", "max/ideal", "lower bound", "redundant slots", "target"],
        rows,
    )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    parser.add_argument("--only", nargs="*", help="items to run: 1 1b 2 (or 3) 4 5")
    args = parser.parse_args()
    only = set(args.only or ["1", "1b", "2", "4", "5"])
    if "3" in only:  # items 2 and 3 share the standard suite
        only.add("2")
    report: dict[str, Any] = {}
    if "5" in only:
        report["expert_placement"] = expert_balance()
    if "1" in only:
        report["optimality"] = optimality(args.instances, args.seed)
    if "1b" in only:
        report["mixed_pipelines"] = mixed_pipelines()
    if "2" in only:
        try:
            report["suite"] = suite()
        except PlanningError as error:
            report["suite"] = {"error": str(error)}
    if "4" in only:
        report["planning_time"] = planning_time(args.repeats)
    report["cost_model_accuracy"] = "see bench_accuracy.py"
    print("\n## 6. cost-model accuracy: bench/planner/bench_accuracy.py (runs the trainer)")
    text = json.dumps(report, indent=1, default=str)
    print("\n## JSON\n" + text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
