"""The ideal bound: a linear program no real plan can beat.

Each operation class (attention, expert FFN, dense FFN, embedding/head, optimizer)
may be split over the grades in any proportion, so that all grades finish together;
a grade can only take a share of a class whose parameter state fits in its memory.
Communication, bubbles and imbalance are free here, which is why it is a bound. The
LP has a handful of variables, so a small dense two-phase simplex (Bland's rule)
solves it exactly without a numerical dependency.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hetmoe_operator.placement.cost_model import class_flops_per_token
from hetmoe_operator.placement.layout import Problem

_EPS = 1e-12


def solve_lp(
    cost: Sequence[float],
    a_ub: Sequence[Sequence[float]],
    b_ub: Sequence[float],
    a_eq: Sequence[Sequence[float]],
    b_eq: Sequence[float],
) -> tuple[float, list[float]] | None:
    """Minimise ``cost . x`` s.t. ``a_ub x <= b_ub``, ``a_eq x = b_eq``, ``x >= 0``.

    Right-hand sides must be non-negative. Returns (optimum, x) or None when the
    program is infeasible or unbounded.
    """
    n = len(cost)
    m_ub, m_eq = len(a_ub), len(a_eq)
    width = n + m_ub + m_eq
    table: list[list[float]] = []
    for i, row in enumerate(a_ub):
        line = [*map(float, row), *([0.0] * (m_ub + m_eq)), float(b_ub[i])]
        line[n + i] = 1.0
        table.append(line)
    for j, row in enumerate(a_eq):
        line = [*map(float, row), *([0.0] * (m_ub + m_eq)), float(b_eq[j])]
        line[n + m_ub + j] = 1.0
        table.append(line)
    basis = list(range(n, width))
    artificial = set(range(n + m_ub, width))

    def pivot(row: int, col: int) -> None:
        pivot_line = table[row]
        factor = pivot_line[col]
        table[row] = pivot_line = [v / factor for v in pivot_line]
        for r, line in enumerate(table):
            if r != row and abs(line[col]) > _EPS:
                f = line[col]
                table[r] = [v - f * p for v, p in zip(line, pivot_line, strict=True)]
        basis[row] = col

    def optimise(objective: list[float], allowed: set[int]) -> bool:
        while True:
            reduced = [
                objective[j] - sum(objective[basis[i]] * table[i][j] for i in range(len(table)))
                for j in range(width)
            ]
            entering = next((j for j in sorted(allowed) if reduced[j] < -1e-10), None)
            if entering is None:
                return True
            best_row = -1
            best_ratio = 0.0
            for i, line in enumerate(table):
                if line[entering] > 1e-10:
                    ratio = line[-1] / line[entering]
                    if (
                        best_row < 0
                        or ratio < best_ratio - _EPS
                        or (abs(ratio - best_ratio) <= _EPS and basis[i] < basis[best_row])
                    ):
                        best_row, best_ratio = i, ratio
            if best_row < 0:
                return False
            pivot(best_row, entering)

    phase_one = [0.0] * n + [0.0] * m_ub + [1.0] * m_eq
    optimise(phase_one, set(range(width)))
    if sum(table[i][-1] for i, b in enumerate(basis) if b in artificial) > 1e-9:
        return None
    for i, b in enumerate(basis):
        if b in artificial:
            col = next((j for j in range(n + m_ub) if abs(table[i][j]) > 1e-10), None)
            if col is not None:
                pivot(i, col)
    full_cost = [*map(float, cost), *([0.0] * (m_ub + m_eq))]
    if not optimise(full_cost, set(range(n + m_ub))):
        return None
    x = [0.0] * n
    for i, b in enumerate(basis):
        if b < n:
            x[b] = table[i][-1]
    return sum(c * v for c, v in zip(cost, x, strict=True)), x


@dataclass(frozen=True)
class DeviceClass:
    """A set of identical devices the bound may use."""

    name: str
    devices: int
    seconds_per_unit: dict[str, float]
    """Seconds one device needs per unit of work of each operation class."""
    memory_bytes: float
    """Usable memory of all its devices together."""


def ideal_seconds(
    work: dict[str, float],
    state_bytes: dict[str, float],
    classes: Sequence[DeviceClass],
) -> tuple[float, dict[str, dict[str, float]]] | None:
    """Shortest time to do ``work`` (units per class) on ``classes`` working together.

    Returns the time and the share of each operation class per device class, or None
    when the parameter state does not fit even when spread perfectly.
    """
    ops = [op for op in work if work[op] > 0]
    # Normalise the makespan so tableau entries are O(1) whatever the units.
    scale = sum(work[op] * classes[0].seconds_per_unit[op] / classes[0].devices for op in ops)
    variables = [(g, op) for g in range(len(classes)) for op in ops]
    n = len(variables) + 1  # the last variable is the makespan T
    cost = [0.0] * (n - 1) + [1.0]
    a_ub: list[list[float]] = []
    b_ub: list[float] = []
    for g, device in enumerate(classes):
        time_row = [0.0] * n
        memory_row = [0.0] * n
        for k, (gg, op) in enumerate(variables):
            if gg == g:
                time_row[k] = work[op] * device.seconds_per_unit[op] / device.devices / scale
                memory_row[k] = state_bytes.get(op, 0.0) / device.memory_bytes
        time_row[-1] = -1.0
        a_ub += [time_row, memory_row]
        b_ub += [0.0, 1.0]
    a_eq = []
    for op in ops:
        row = [0.0] * n
        for k, (_, vop) in enumerate(variables):
            if vop == op:
                row[k] = 1.0
        a_eq.append(row)
    solved = solve_lp(cost, a_ub, b_ub, a_eq, [1.0] * len(ops))
    if solved is None:
        return None
    normalised, x = solved
    seconds = normalised * scale
    shares = {
        device.name: {op: x[k] for k, (g, op) in enumerate(variables) if g == index}
        for index, device in enumerate(classes)
    }
    return seconds, shares


def ideal_tokens_per_s(problem: Problem, devices_per_pool: dict[str, int]) -> float:
    """The LP bound on tokens/s for the devices a plan uses (0 if the state cannot fit)."""
    model = problem.model
    a = problem.assumptions
    passes = 1.0 + a.backward_factor
    flops = class_flops_per_token(model, problem.training.sequence_length)
    work = {op: passes * value for op, value in flops.items()}
    work["optimizer"] = model.total_params * a.optimizer_flops_per_param / problem.tokens_per_step
    per_param = a.weight_bytes + a.gradient_bytes + a.optimizer_bytes
    layers = range(model.num_hidden_layers)
    moe = [layer for layer in layers if model.is_moe_layer(layer)]
    state: dict[str, float] = {
        "attention": per_param * sum(model.attention_params + model.hidden_size for _ in layers),
        "expert_ffn": per_param
        * len(moe)
        * (
            model.num_experts * model.expert_params
            + model.shared_expert_params
            + model.router_params
        ),
        "dense_ffn": per_param * (model.num_hidden_layers - len(moe)) * model.dense_ffn_params,
        "embedding": per_param * 2 * model.embedding_params,
    }
    by_grade: dict[str, int] = {}
    for pool, count in devices_per_pool.items():
        name = problem.pools[pool].grade.name
        by_grade[name] = by_grade.get(name, 0) + count
    classes = []
    for grade_name, count in sorted(by_grade.items()):
        grade = problem.cluster.catalog.grade(grade_name)
        classes.append(
            DeviceClass(
                name=grade_name,
                devices=count,
                seconds_per_unit={op: 1.0 / (grade.effective_tflops(op) * 1e12) for op in work},
                memory_bytes=count * problem.memory.usable_bytes(grade),
            )
        )
    solved = ideal_seconds(work, state, classes)
    if solved is None or solved[0] <= 0:
        return 0.0
    return 1.0 / solved[0]
