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
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hetmoe_operator.api.model import PRESETS, ModelArchitecture
from hetmoe_operator.api.training import TrainingConfig
from hetmoe_operator.plan import StagePlan
from hetmoe_trainer.model import ExpertParallel, Stage, build_stage
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


def collect(model: nn.Module, tokens: torch.Tensor, *, step: int = 0) -> dict[str, Any]:
    """Forward ``tokens`` through a whole-model stage, backward the loss, return the stats."""
    forward: list[dict[str, Any]] = []
    backward: list[dict[str, Any]] = []
    calls: dict[str, int] = {}

    def hook(name: str) -> Any:
        def record(_module: nn.Module, _inputs: object, output: object) -> None:
            tensor = _first_tensor(output)
            if tensor is None:
                return
            calls[name] = calls.get(name, 0) + 1
            key = name if calls[name] == 1 else f"{name}#{calls[name]}"
            forward.append({"module": key, **tensor_stats(tensor)})
            if tensor.requires_grad:
                tensor.register_hook(
                    lambda grad: backward.append({"module": key, **tensor_stats(grad)})
                )

        return record

    handles = [
        module.register_forward_hook(hook(name))
        for name, module in model.named_modules()
        if name and not isinstance(module, (nn.ModuleDict, nn.ModuleList))
    ]
    try:
        model.zero_grad(set_to_none=True)
        logits = model(tokens, step=step)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    grads = [
        {"module": name, **tensor_stats(p.grad)}
        for name, p in model.named_parameters()
        if p.grad is not None
    ]
    return {"loss": loss.item(), "forward": forward, "backward": backward, "param_grads": grads}


def fixed_batch(arch: ModelArchitecture, batch: int, seq: int, seed: int) -> torch.Tensor:
    """The seeded token batch every run uses (drawn on CPU)."""
    return torch.randint(0, arch.vocab_size, (batch, seq), generator=cpu_generator(seed, "batch"))


def whole_model(
    arch: ModelArchitecture, *, device: str, dtype: torch.dtype, seed: int = 1234
) -> Stage:
    """The whole model as one stage hosting every expert, deterministically initialised."""
    training = TrainingConfig(steps=1, global_batch_size=1, sequence_length=2, seed=seed)
    plan = StagePlan(
        index=0,
        layer_start=0,
        layer_end=arch.num_hidden_layers,
        has_embedding=True,
        has_head=True,
    )
    ep = ExpertParallel(None, [list(range(arch.num_experts))], 0)
    return build_stage(arch, plan, training, ep, device=device, dtype=dtype)


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
) -> dict[str, Any]:
    """Build the whole model on one device and collect its alignment statistics."""
    model = whole_model(arch, device=device, dtype=dtype, seed=seed)
    for moe in model.moe_layers().values():
        moe.grouped_mm = grouped_mm
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
    run_p.add_argument("--out", required=True, type=Path)
    cmp_p = sub.add_parser("compare", help="find the first module where two runs diverge")
    cmp_p.add_argument("a", type=Path)
    cmp_p.add_argument("b", type=Path)
    cmp_p.add_argument("--rtol", type=float, default=1e-3)
    cmp_p.add_argument("--atol", type=float, default=1e-8)
    args = parser.parse_args(argv)

    if args.command == "run":
        grouped = {"auto": None, "on": True, "off": False}[args.grouped_mm]
        stats = run(
            PRESETS[args.preset],
            device=args.device,
            dtype=DTYPES[args.dtype],
            seed=args.seed,
            batch=args.batch,
            seq=args.seq,
            step=args.step,
            grouped_mm=grouped,
        )
        stats["meta"]["preset"] = args.preset
        args.out.write_text(json.dumps(stats) + "\n")
        print(f"loss {stats['loss']:.6f}; {len(stats['forward'])} modules -> {args.out}")
        return 0

    a, b = json.loads(args.a.read_text()), json.loads(args.b.read_text())
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
