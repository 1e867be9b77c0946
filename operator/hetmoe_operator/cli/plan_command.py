"""``hetmoe plan``: show how a job would be laid out on a cluster, and what it costs.

The table output explains the choice (per pool, per stage, where the step time and
memory go, the assumptions) and compares it with a type-blind even split and with
the best plan on each single grade; ``-o json`` prints the Plan itself, the contract
the trainer consumes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hetmoe_operator.api.cluster import ClusterDescription
from hetmoe_operator.api.manifests import load_cluster, load_job, read_yaml
from hetmoe_operator.errors import UserError
from hetmoe_operator.placement import (
    Alternative,
    Comparison,
    PlanningError,
    compare_baselines,
    plan_job,
)
from hetmoe_operator.placement.profile import cluster_with_profiles, shared_throughput
from hetmoe_operator.plan import Plan

OBJECTIVES = ("throughput", "cost", "throughput-under-budget")


def register(subparsers: Any) -> None:
    """Add the ``plan`` sub-command."""
    parser = subparsers.add_parser(
        "plan",
        help="plan a MoEJob on a cluster and compare with simpler layouts",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-f", "--file", required=True, type=Path, help="MoEJob manifest")
    parser.add_argument(
        "--cluster", required=True, type=Path, help="cluster file (catalog or catalogFile + pools)"
    )
    parser.add_argument("--objective", choices=OBJECTIVES, help="override spec.placement.objective")
    parser.add_argument("--budget", type=float, help="override spec.placement.budgetPerHour")
    parser.add_argument(
        "--expert-load",
        type=Path,
        help="YAML/JSON list of expected per-expert load (default: uniform)",
    )
    parser.add_argument(
        "--profile",
        action="append",
        default=[],
        metavar="GRADE=FILE",
        help="take GRADE's speed from a `hetmoe profile` file instead of peak x efficiency",
    )
    parser.add_argument(
        "--processes-per-machine",
        type=int,
        default=1,
        metavar="N",
        help="with --profile: N worker processes share the profiled machine's cores "
        "(local mode on one machine: the cluster's device count)",
    )
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table")
    parser.set_defaults(handler=run)


def apply_profiles(
    cluster: ClusterDescription, specs: list[str], processes: int
) -> ClusterDescription:
    """``cluster`` with each ``GRADE=FILE`` profile applied to its grade."""
    if not specs:
        return cluster
    if processes < 1:
        raise UserError(f"--processes-per-machine must be at least 1, got {processes}")
    from hetmoe_operator.cli.profile_command import load_profile

    measured = {}
    for spec in specs:
        grade, sep, file = spec.partition("=")
        if not sep or not grade or not file:
            raise UserError(f"--profile {spec!r}: expected GRADE=FILE")
        profile = load_profile(Path(file))
        measured[grade] = shared_throughput(profile, processes)
    try:
        return cluster_with_profiles(cluster, measured)
    except KeyError as error:
        raise UserError(f"--profile: {error.args[0]}") from None


def _expert_load(path: Path | None) -> list[float] | None:
    if path is None:
        return None
    data = read_yaml(path)
    if not isinstance(data, list) or not all(isinstance(x, int | float) for x in data):
        raise UserError(f"{path}: expected a list of numbers (one per routed expert)")
    return [float(x) for x in data]


def run(args: argparse.Namespace) -> int:
    """Plan and print; infeasible requests become a UserError naming the constraint."""
    job = load_job(args.file)
    cluster = apply_profiles(load_cluster(args.cluster), args.profile, args.processes_per_machine)
    placement = job.spec.placement
    updates: dict[str, Any] = {}
    if args.objective:
        updates["objective"] = args.objective
    if args.budget is not None:
        updates["budget_per_hour"] = args.budget
    if updates:
        placement = placement.model_validate({**placement.model_dump(), **updates})
    load = _expert_load(args.expert_load)
    model = job.spec.model.resolve()
    try:
        if args.output == "json":
            plan = plan_job(
                model,
                job.spec.training,
                cluster,
                placement,
                job_name=job.metadata.name,
                expert_load=load,
            )
            print(plan.to_json())
            return 0
        comparison = compare_baselines(
            model,
            job.spec.training,
            cluster,
            placement,
            job_name=job.metadata.name,
            expert_load=load,
        )
    except PlanningError as error:
        raise UserError(f"cannot plan {job.metadata.name} ({error.constraint}): {error}") from None
    print(render(comparison))
    return 0


def _money(value: float | None, currency: str) -> str:
    if value is None:
        return "-"
    if value >= 1e6:
        return f"{value / 1e6:.2f}M {currency}"
    return f"{value:,.0f} {currency}"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return out


def _alternative_row(alt: Alternative, currency: str) -> list[str]:
    return [
        alt.name,
        str(alt.devices) if alt.devices else "-",
        f"{alt.tokens_per_s:,.0f}" if alt.tokens_per_s else "-",
        _money(alt.cost_per_hour, currency) if alt.cost_per_hour is not None else "-",
        _money(alt.cost_per_1t_tokens, currency),
        alt.note,
    ]


def _schedule(plan: Plan) -> str:
    """The pipeline schedule the trainer will run, and which chunks each position holds."""
    pp = plan.parallel.pp
    if pp == 1:
        return "no pipeline (one stage)"
    if plan.pipeline_shape == "v":
        return (
            "zero-bubble V (ZB-V, torch ScheduleZBVZeroBubble): position r holds stages r "
            f"and {2 * pp - 1} - r, weight gradients fill the bubble"
        )
    if plan.split_backward:
        if plan.virtual_stages == 1:
            return (
                "ZB-H1 (torch ScheduleInterleavedZeroBubble, one stage per position): 1F1B "
                "with the backward split, weight gradients fill the drain"
            )
        return (
            f"ZB1P (torch ScheduleInterleavedZeroBubble), {plan.virtual_stages} virtual "
            f"stages per position: position r holds stages r, r + {pp}, ...; weight "
            "gradients fill the bubble"
        )
    if plan.virtual_stages > 1:
        return (
            f"interleaved 1F1B, {plan.virtual_stages} virtual stages per position: "
            f"position r holds stages r, r + {pp}, ..."
        )
    return "1F1B"


def render(comparison: Comparison) -> str:
    """Human-readable report of the plan and its comparison."""
    plan: Plan = comparison.plan
    prediction = plan.prediction
    assert prediction is not None
    cur = plan.currency
    p = plan.parallel
    lines = [
        f"plan for {plan.job}: objective {plan.objective}, {plan.world_size} devices, "
        f"pp={p.pp} dp={p.dp} ep={p.ep} tp={p.tp}",
        f"schedule: {_schedule(plan)}",
        "",
        "pools",
    ]
    lines += _table(
        [
            "pool",
            "grade",
            "nodes",
            "devices",
            "stages",
            "layers",
            "experts/dev",
            "tokens/s",
            f"{cur}/h",
        ],
        [
            [
                s.pool,
                s.grade,
                str(s.nodes),
                str(s.devices),
                _span(s.stages),
                s.layers,
                f"{s.experts_per_device:g}",
                f"{s.predicted_tokens_per_s:,.0f}",
                f"{s.cost_per_hour:,.2f}",
            ]
            for s in plan.pools
        ],
    )
    lines += ["", "stages"]
    memory = {(m.pool, m.stage): m for m in prediction.memory}
    rows = []
    for stage in plan.stages:
        # With several chunks per position (virtual_stages > 1) ranks, memory and
        # times are per pipeline position (ranks' ``stage``); see Plan.position_of.
        position = plan.position_of(stage.index)
        pools = sorted({r.pool for r in plan.ranks if r.stage == position})
        peak = max(
            (memory[(pool, position)] for pool in pools),
            key=lambda m: m.total_gib / m.capacity_gib,
        )
        times = [e for e in prediction.stages if e.stage == position]
        slowest = max(times, key=lambda e: e.step_seconds, default=None)
        rows.append(
            [
                str(stage.index),
                str(position),
                f"{stage.layer_start}-{stage.layer_end - 1}" if stage.layers else "(none)",
                ("embedding " if stage.has_embedding else "") + ("head" if stage.has_head else ""),
                "yes" if stage.recompute_activations else "no",
                ",".join(pools),
                f"{peak.total_gib:.1f}/{peak.capacity_gib:.0f} GiB ({peak.pool})",
                f"{slowest.microbatch_seconds * 1e3:.3g} ms x {slowest.microbatches} "
                f"({slowest.pool}); done at {slowest.step_seconds:.3g} s"
                if slowest
                else "-",
            ]
        )
    headers = ["stage", "position", "layers", "extras", "recompute", "pools", "peak memory"]
    headers.append("time per step")
    lines += _table(headers, rows)
    step = prediction.step_time
    lines += [
        "",
        f"step time {step.total:.3f} s = compute {step.compute:.3f} + bubble {step.bubble:.3f} "
        f"+ communication {step.communication:.3f} + imbalance {step.imbalance:.3f} "
        f"+ optimizer {step.optimizer:.3f}",
        f"throughput {prediction.tokens_per_s:,.0f} tokens/s; ideal bound "
        f"{prediction.ideal_tokens_per_s:,.0f} tokens/s ({prediction.fraction_of_ideal:.0%} "
        "of it)",
        f"cost {prediction.cost_per_hour:,.2f} {cur}/h; "
        f"{_money(prediction.cost_per_1t_tokens, cur)} per 10^12 tokens",
        "",
        "compared with",
    ]
    chosen = Alternative(
        "this plan",
        prediction.tokens_per_s,
        prediction.cost_per_hour,
        prediction.cost_per_1t_tokens,
        plan.world_size,
        f"pp={p.pp} ep={p.ep} dp={p.dp}",
    )
    alternatives = [chosen, comparison.even_split, *comparison.single_grade]
    lines += _table(
        ["layout", "devices", "tokens/s", f"{cur}/h", "per 1T tokens", "notes"],
        [_alternative_row(a, cur) for a in alternatives],
    )
    lines += _verdict(comparison, chosen)
    lines += ["", "assumptions"] + [f"  - {a}" for a in prediction.assumptions]
    return "\n".join(lines)


def _verdict(comparison: Comparison, chosen: Alternative) -> list[str]:
    out = [""]
    even = comparison.even_split
    assert chosen.tokens_per_s is not None and chosen.cost_per_1t_tokens is not None
    if even.tokens_per_s and even.cost_per_1t_tokens:
        out.append(
            f"vs even split: {chosen.tokens_per_s / even.tokens_per_s:.2f}x throughput, "
            f"{1 - chosen.cost_per_1t_tokens / even.cost_per_1t_tokens:.1%} lower cost per "
            "1T tokens"
        )
    for alt in comparison.single_grade:
        if alt.cost_per_1t_tokens and alt.tokens_per_s:
            saving = 1 - chosen.cost_per_1t_tokens / alt.cost_per_1t_tokens
            out.append(
                f"vs {alt.name}: {chosen.tokens_per_s / alt.tokens_per_s:.2f}x throughput; "
                f"cost per 1T tokens {_money(chosen.cost_per_1t_tokens, '')}vs "
                f"{_money(alt.cost_per_1t_tokens, '')}({saving:.1%} saving)"
            )
    return out


def _span(stages: list[int]) -> str:
    if not stages:
        return "-"
    if stages == list(range(stages[0], stages[-1] + 1)) and len(stages) > 1:
        return f"{stages[0]}-{stages[-1]}"
    return ",".join(map(str, stages))
