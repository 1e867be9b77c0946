"""Cross-grade numerical alignment: per-module forward and backward statistics.

The Ling report's hard lesson: after moving to another device kind the loss drifted
until forward and then backward passes were aligned module by module. This tool
makes that a routine preflight:

``python -m hetmoe_trainer.align run --preset tiny --device cpu --dtype float32 --out a.json``
pushes a fixed seeded batch through the whole model (built with the same
deterministic initialisation everywhere), runs backward on the language-model loss
plus the attached balancing losses, and writes for every module the statistics
(mean, std, abs max, L2 norm and a small fingerprint of seeded random projections)
of its output in forward order and of the gradient at its output in backward
order, then of every parameter gradient.

Across parallel layouts: ``torchrun --nproc-per-node=N -m hetmoe_trainer align run
--pp P --ep E --out b.json`` (``N = P * E``, gloo on CPU) runs the same batch through
``P`` pipeline stages (even layer split, activations and gradients sent point to
point) of ``E`` expert-parallel members each (routed experts split evenly). Member 0
of each stage feeds the whole batch and the others none, so the balancing losses see
the same tokens as one process and the objective is unchanged; the others still host
their experts and serve the all-to-alls. Every rank records its modules under their
global names; rank 0 gathers the tensors, concatenates each module's non-empty
outputs (an expert's rows live on its host), sums parameter gradients over ranks,
and writes the statistics, so the file compares directly against a single-process
run. ``--perturb NAME=FACTOR`` scales one parameter (global name) before the run, to
check that a deviation is found where it was made.

``python -m hetmoe_trainer.align compare a.json b.json [--rtol 1e-3]`` reports the
largest deviation and the FIRST module (forward order, then backward, then
parameter gradients) deviating beyond ``rtol``; it exits 1 when something diverges
and 2 when the two runs have no module in common. Modules only one run recorded
(the per-expert modules a grouped-matmul run never calls) are listed, not compared.

Deviation of a statistic: ``|a - b| / max(scale, atol)``, where ``scale`` is
``max(|a|, |b|)`` for std, abs max and norm, and the tensor's RMS for mean and
fingerprint (a mean near zero is judged against the spread of the values).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hetmoe_operator.api.model import PRESETS, ModelArchitecture
from hetmoe_operator.api.training import TrainingConfig
from hetmoe_operator.plan import StagePlan
from hetmoe_trainer.model import ExpertParallel, Stage, build_stage
from hetmoe_trainer.model.experts import per_expert_tensors
from hetmoe_trainer.model.init import cpu_generator

FINGERPRINT_PROJECTIONS = 4
STATS = ("mean", "std", "absmax", "norm", "fingerprint")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tensor_stats(t: torch.Tensor) -> dict[str, Any]:
    """Statistics of ``t`` computed in float64 on CPU (device-independent arithmetic)."""
    x = t.detach().to("cpu", torch.float64).flatten()
    n = x.numel()
    gen = cpu_generator("align-fingerprint", n)
    signs = torch.randint(0, 2, (FINGERPRINT_PROJECTIONS, n), generator=gen).double() * 2 - 1
    return {
        "numel": n,
        "mean": x.mean().item() if n else 0.0,
        "std": x.std(unbiased=False).item() if n else 0.0,
        "absmax": x.abs().max().item() if n else 0.0,
        "norm": x.norm().item(),
        "fingerprint": (signs @ x / math.sqrt(max(n, 1))).tolist(),
    }


def _first_tensor(output: object) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, torch.Tensor)), None)
    return None


class _Recorder:
    """Forward hooks on every module: its output tensor, and the gradient reaching it.

    Tensors are kept (detached, on CPU) rather than reduced to statistics right away,
    so a parallel run can first concatenate each module's pieces from all ranks.
    A module called more than once gets ``name#2``, ``name#3``... for later calls.
    """

    def __init__(self, model: nn.Module) -> None:
        self.forward: list[tuple[str, torch.Tensor]] = []
        self.backward: list[tuple[str, torch.Tensor]] = []
        self._calls: dict[str, int] = {}
        self._handles = [
            module.register_forward_hook(self._hook(name))
            for name, module in model.named_modules()
            if name and not isinstance(module, (nn.ModuleDict, nn.ModuleList))
        ]

    def _hook(self, name: str) -> Any:
        def record(_module: nn.Module, _inputs: object, output: object) -> None:
            tensor = _first_tensor(output)
            if tensor is None:
                return
            self._calls[name] = self._calls.get(name, 0) + 1
            key = name if self._calls[name] == 1 else f"{name}#{self._calls[name]}"
            self.forward.append((key, tensor.detach().cpu().clone()))
            if tensor.requires_grad:
                tensor.register_hook(
                    lambda grad: self.backward.append((key, grad.detach().cpu().clone()))
                )

        return record

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()


def _lm_loss(logits: torch.Tensor, tokens: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """Next-token cross-entropy summed over ``tokens``' rows, over the batch's token count."""
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum"
    )
    return loss / total_tokens


def _with_stats(
    loss: float,
    forward: list[tuple[str, torch.Tensor]],
    backward: list[tuple[str, torch.Tensor]],
    grads: list[tuple[str, torch.Tensor]],
) -> dict[str, Any]:
    def entries(items: list[tuple[str, torch.Tensor]]) -> list[dict[str, Any]]:
        return [{"module": key, **tensor_stats(tensor)} for key, tensor in items]

    return {
        "loss": loss,
        "forward": entries(forward),
        "backward": entries(backward),
        "param_grads": entries(grads),
    }


def collect(model: nn.Module, tokens: torch.Tensor, *, step: int = 0) -> dict[str, Any]:
    """Forward ``tokens`` through a whole-model stage, backward the loss, return the stats."""
    recorder = _Recorder(model)
    try:
        model.zero_grad(set_to_none=True)
        logits = model(tokens, step=step)
        loss = _lm_loss(logits, tokens, tokens.shape[0] * (tokens.shape[1] - 1))
        loss.backward()
    finally:
        recorder.close()
    return _with_stats(loss.item(), recorder.forward, recorder.backward, parameter_grads(model))


def parameter_grads(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameter gradients by name, routed experts per expert (global ids, as on disk).

    Per expert rather than per stacked tensor, so runs hosting different experts per
    rank compare (and merge) expert by expert.
    """
    return [
        (name, grad)
        for full, p in model.named_parameters()
        if p.grad is not None
        for name, grad in per_expert_tensors(model, full, p.grad)
    ]


def fixed_batch(arch: ModelArchitecture, batch: int, seq: int, seed: int) -> torch.Tensor:
    """The seeded token batch every run uses (drawn on CPU)."""
    return torch.randint(0, arch.vocab_size, (batch, seq), generator=cpu_generator(seed, "batch"))


def whole_model(
    arch: ModelArchitecture, *, device: str, dtype: torch.dtype, seed: int = 1234
) -> Stage:
    """The whole model as one stage hosting every expert, deterministically initialised."""
    ep = ExpertParallel(None, [list(range(arch.num_experts))], 0)
    return _build(arch, _stage_plans(arch, 1)[0], ep, device=device, dtype=dtype, seed=seed)


def _build(
    arch: ModelArchitecture,
    plan: StagePlan,
    ep: ExpertParallel,
    *,
    device: str,
    dtype: torch.dtype,
    seed: int,
) -> Stage:
    training = TrainingConfig(steps=1, global_batch_size=1, sequence_length=2, seed=seed)
    return build_stage(arch, plan, training, ep, device=device, dtype=dtype)


def _stage_plans(arch: ModelArchitecture, pp: int) -> list[StagePlan]:
    """``pp`` stages of near-equal layer counts (earlier stages take the remainder)."""
    base, extra = divmod(arch.num_hidden_layers, pp)
    plans, start = [], 0
    for index in range(pp):
        end = start + base + (1 if index < extra else 0)
        plans.append(
            StagePlan(
                index=index,
                layer_start=start,
                layer_end=end,
                has_embedding=index == 0,
                has_head=index == pp - 1,
            )
        )
        start = end
    return plans


def parse_perturbation(spec: str) -> tuple[str, float]:
    """``NAME=FACTOR`` -> (parameter name, factor); ValueError naming the problem."""
    name, sep, factor = spec.partition("=")
    try:
        value = float(factor)
    except ValueError:
        value = math.nan
    if not sep or not name or not math.isfinite(value):
        raise ValueError(f"--perturb {spec!r}: expected PARAMETER=FACTOR, e.g. head.weight=1.01")
    return name, value


@torch.no_grad()
def perturb(model: nn.Module, name: str, factor: float) -> bool:
    """Scale parameter ``name`` (a routed expert's by its per-expert name) by ``factor``.

    False if this model does not hold it.
    """
    params = {
        name: view
        for full, p in model.named_parameters()
        for name, view in per_expert_tensors(model, full, p)
    }
    if name not in params:
        return False
    params[name].mul_(factor)
    return True


def _split_experts(num_experts: int, ep: int) -> list[list[int]]:
    if ep < 1 or num_experts % ep:
        raise ValueError(f"--ep {ep} must divide the model's {num_experts} experts")
    size = num_experts // ep
    return [list(range(m * size, (m + 1) * size)) for m in range(ep)]


def run_parallel(
    arch: ModelArchitecture,
    *,
    pp: int,
    ep: int,
    device: str,
    dtype: torch.dtype,
    seed: int = 1234,
    batch: int = 2,
    seq: int = 32,
    step: int = 0,
    grouped_mm: bool | None = None,
    perturbation: tuple[str, float] | None = None,
) -> dict[str, Any] | None:
    """The statistics of a ``pp`` x ``ep`` layout on the default process group.

    Collective: every rank of a ``pp * ep`` world calls it; rank ``s * ep + m`` is
    member ``m`` of stage ``s``. Returns the merged statistics on rank 0, None elsewhere.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != pp * ep:
        raise ValueError(f"--pp {pp} x --ep {ep} needs {pp * ep} processes, not {world}")
    if pp > arch.num_hidden_layers:
        raise ValueError(f"--pp {pp} exceeds the model's {arch.num_hidden_layers} layers")
    rank_experts = _split_experts(arch.num_experts, ep)
    stage, member = divmod(rank, ep)
    groups = [
        dist.new_group(list(range(s * ep, (s + 1) * ep))) if ep > 1 else None for s in range(pp)
    ]
    model = _build(
        arch,
        _stage_plans(arch, pp)[stage],
        ExpertParallel(groups[stage], rank_experts, member),
        device=device,
        dtype=dtype,
        seed=seed,
    )
    for moe in model.moe_layers().values():
        moe.grouped_mm = grouped_mm
    found = torch.tensor([0.0])
    if perturbation is not None:
        found[0] = float(perturb(model, *perturbation))
        dist.all_reduce(found)
        if not found.item():
            raise ValueError(f"--perturb: no parameter is called {perturbation[0]!r}")

    tokens = fixed_batch(arch, batch, seq, seed).to(device)
    mine = tokens if member == 0 else tokens[:0]
    rows = mine.shape[0]
    recorder = _Recorder(model)
    loss = torch.zeros(())
    try:
        model.zero_grad(set_to_none=True)
        x: torch.Tensor = mine
        if stage > 0:
            x = torch.empty(rows, seq, arch.hidden_size, device=device, dtype=dtype)
            if rows:
                dist.recv(x, rank - ep)
            x.requires_grad_(True)
        out = model(x, step=step)
        if stage == pp - 1:
            loss = _lm_loss(out, mine, batch * (seq - 1))
            loss.backward()
        else:
            grad = torch.empty_like(out)
            if rows:
                dist.send(out.detach().contiguous(), rank + ep)
                dist.recv(grad, rank + ep)
            out.backward(grad)
        if stage > 0 and rows:
            assert x.grad is not None
            dist.send(x.grad.contiguous(), rank - ep)
    finally:
        recorder.close()
    grads = [(n, g.detach().to("cpu", copy=True)) for n, g in parameter_grads(model)]
    mine_payload = (stage, member, loss.item(), recorder.forward, recorder.backward, grads)
    gathered: list[Any] = [None] * world if rank == 0 else []
    dist.gather_object(mine_payload, gathered if rank == 0 else None, dst=0)
    if rank != 0:
        return None
    return _merge(gathered)


def _merge(payloads: list[Any]) -> dict[str, Any]:
    """One run's statistics from every rank's recorded tensors (see the module docstring)."""
    forward_order = sorted(payloads, key=lambda p: (p[0], p[1]))
    backward_order = sorted(payloads, key=lambda p: (-p[0], p[1]))

    def concatenated(ordered: list[Any], index: int) -> list[tuple[str, torch.Tensor]]:
        pieces: dict[str, list[torch.Tensor]] = {}
        for payload in ordered:
            for key, tensor in payload[index]:
                pieces.setdefault(key, []).append(tensor)
        merged = []
        for key, parts in pieces.items():
            # Members without tokens record empty outputs; an expert nobody routed to
            # is empty everywhere, as in one process.
            full = [t for t in parts if t.numel()] or parts[:1]
            merged.append((key, torch.cat(full) if len(full) > 1 else full[0]))
        return merged

    grads: dict[str, torch.Tensor] = {}
    for payload in forward_order:
        for name, grad in payload[5]:
            grads[name] = grads[name] + grad if name in grads else grad
    return _with_stats(
        sum(p[2] for p in payloads),
        concatenated(forward_order, 3),
        concatenated(backward_order, 4),
        list(grads.items()),
    )


def run(
    arch: ModelArchitecture,
    *,
    device: str,
    dtype: torch.dtype,
    seed: int = 1234,
    batch: int = 2,
    seq: int = 32,
    step: int = 0,
    grouped_mm: bool | None = None,
    perturbation: tuple[str, float] | None = None,
) -> dict[str, Any]:
    """Build the whole model on one device and collect its alignment statistics."""
    model = whole_model(arch, device=device, dtype=dtype, seed=seed)
    for moe in model.moe_layers().values():
        moe.grouped_mm = grouped_mm
    if perturbation is not None and not perturb(model, *perturbation):
        raise ValueError(f"--perturb: no parameter is called {perturbation[0]!r}")
    stats = collect(model, fixed_batch(arch, batch, seq, seed).to(device), step=step)
    meta = {"device": device, "dtype": str(dtype), "seed": seed, "batch": batch, "seq": seq}
    return {"meta": meta, **stats}


@dataclass(frozen=True)
class Deviation:
    """One statistic of one module compared between two runs."""

    phase: str
    module: str
    stat: str
    value: float

    def describe(self) -> str:
        """Human-readable one-liner."""
        return f"{self.phase} {self.module} [{self.stat}] relative deviation {self.value:.3e}"


def _rms(entry: dict[str, Any]) -> float:
    return float(entry["norm"]) / math.sqrt(max(int(entry["numel"]), 1))


def _entry_deviations(
    phase: str, a: dict[str, Any], b: dict[str, Any], atol: float
) -> list[Deviation]:
    out = []
    spread = max(_rms(a), _rms(b), atol)
    for stat in STATS:
        xs = a[stat] if isinstance(a[stat], list) else [a[stat]]
        ys = b[stat] if isinstance(b[stat], list) else [b[stat]]
        for x, y in zip(xs, ys, strict=True):
            scale = spread if stat in ("mean", "fingerprint") else max(abs(x), abs(y), atol)
            value = abs(x - y) / scale
            if math.isnan(value) or math.isnan(x) != math.isnan(y):
                value = math.inf
            out.append(Deviation(phase, a["module"], stat, value))
    return out


@dataclass(frozen=True)
class Comparison:
    """Outcome of comparing two runs."""

    largest: Deviation | None
    """The largest deviation of any statistic."""
    first: Deviation | None
    """The first deviation beyond rtol in run a's order (None: aligned)."""
    only_in_a: list[str]
    """``phase:module`` recorded by run a only (e.g. per-expert modules that a grouped
    matmul run does not call); not compared."""
    only_in_b: list[str]
    """``phase:module`` recorded by run b only."""


def compare(
    a: dict[str, Any], b: dict[str, Any], *, rtol: float = 1e-3, atol: float = 1e-8
) -> Comparison:
    """Compare the modules both runs recorded, in run ``a``'s order.

    Forward outputs first, then output gradients, then parameter gradients. Entries
    are matched by name, not position: independent backward branches may run in a
    different order on another device or autograd graph. Raises ValueError when the
    runs have no module in common.
    """
    largest: Deviation | None = None
    first: Deviation | None = None
    only_a: list[str] = []
    only_b: list[str] = []
    compared = 0
    for phase in ("forward", "backward", "param_grads"):
        entries_b = {e["module"]: e for e in b[phase]}
        names_a = {e["module"] for e in a[phase]}
        only_b += [f"{phase}:{name}" for name in entries_b if name not in names_a]
        for ea in a[phase]:
            eb = entries_b.get(ea["module"])
            if eb is None:
                only_a.append(f"{phase}:{ea['module']}")
                continue
            compared += 1
            for dev in _entry_deviations(phase, ea, eb, atol):
                if largest is None or dev.value > largest.value:
                    largest = dev
                if first is None and dev.value > rtol:
                    first = dev
    if not compared:
        raise ValueError("the two runs recorded no module in common")
    return Comparison(largest, first, only_a, only_b)


def _run_command(args: argparse.Namespace) -> int:
    grouped = {"auto": None, "on": True, "off": False}[args.grouped_mm]
    perturbation = parse_perturbation(args.perturb) if args.perturb else None
    common: dict[str, Any] = {
        "device": args.device,
        "dtype": DTYPES[args.dtype],
        "seed": args.seed,
        "batch": args.batch,
        "seq": args.seq,
        "step": args.step,
        "grouped_mm": grouped,
        "perturbation": perturbation,
    }
    arch = PRESETS[args.preset]
    if args.pp < 1 or args.ep < 1:
        raise ValueError("--pp and --ep must be at least 1")
    if args.pp * args.ep == 1:
        stats: dict[str, Any] | None = run(arch, **common)
    else:
        if "WORLD_SIZE" not in os.environ:
            raise ValueError(
                f"--pp {args.pp} --ep {args.ep} needs {args.pp * args.ep} processes: start it "
                f"with torchrun --nproc-per-node={args.pp * args.ep} -m hetmoe_trainer align run"
            )
        dist.init_process_group("gloo")
        try:
            stats = run_parallel(arch, pp=args.pp, ep=args.ep, **common)
            if stats is not None:
                stats["meta"] = {
                    "device": args.device,
                    "dtype": str(DTYPES[args.dtype]),
                    "seed": args.seed,
                    "batch": args.batch,
                    "seq": args.seq,
                }
        finally:
            dist.destroy_process_group()
    if stats is None:  # not rank 0 of a parallel run
        return 0
    stats["meta"].update(preset=args.preset, pp=args.pp, ep=args.ep, perturb=args.perturb)
    args.out.write_text(json.dumps(stats) + "\n")
    print(f"loss {stats['loss']:.6f}; {len(stats['forward'])} modules -> {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="hetmoe_trainer.align", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="collect per-module statistics of one device/dtype")
    run_p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    run_p.add_argument("--device", default="cpu")
    run_p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    run_p.add_argument("--seed", type=int, default=1234)
    run_p.add_argument("--batch", type=int, default=2)
    run_p.add_argument("--seq", type=int, default=32)
    run_p.add_argument("--step", type=int, default=0)
    run_p.add_argument("--grouped-mm", choices=("auto", "on", "off"), default="auto")
    run_p.add_argument("--pp", type=int, default=1, help="pipeline stages (under torchrun)")
    run_p.add_argument("--ep", type=int, default=1, help="expert-parallel members per stage")
    run_p.add_argument("--perturb", metavar="PARAM=FACTOR", help="scale one parameter first")
    run_p.add_argument("--out", required=True, type=Path)
    cmp_p = sub.add_parser("compare", help="find the first module where two runs diverge")
    cmp_p.add_argument("a", type=Path)
    cmp_p.add_argument("b", type=Path)
    cmp_p.add_argument("--rtol", type=float, default=1e-3)
    cmp_p.add_argument("--atol", type=float, default=1e-8)
    args = parser.parse_args(argv)

    if args.command == "run":
        try:
            return _run_command(args)
        except ValueError as error:
            print(f"align run: {error}", file=sys.stderr)
            return 2

    try:
        a, b = json.loads(args.a.read_text()), json.loads(args.b.read_text())
    except (OSError, ValueError) as error:
        print(f"align compare: cannot read the runs: {error}", file=sys.stderr)
        return 2
    try:
        result = compare(a, b, rtol=args.rtol, atol=args.atol)
    except ValueError as err:
        print(f"not comparable: {err}")
        return 2
    print(f"loss {a['loss']:.6f} vs {b['loss']:.6f}")
    for label, names in (("a", result.only_in_a), ("b", result.only_in_b)):
        if names:
            print(f"{len(names)} entries only in run {label} (not compared), e.g. {names[:3]}")
    if result.largest is not None:
        print(f"largest: {result.largest.describe()}")
    if result.first is None:
        print(f"aligned within rtol {args.rtol}")
        return 0
    print(f"FIRST DIVERGENCE (rtol {args.rtol}): {result.first.describe()}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
