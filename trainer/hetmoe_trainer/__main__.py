"""Worker entry: ``python -m hetmoe_trainer --plan plan.json --checkpoint-dir DIR [...]``.

Started by torchrun in every worker. Finds this worker's plan rank from its seat
(``HETMOE_POOL``, ``HETMOE_NODE_SLOT``, torchrun's ``LOCAL_RANK``; without
``HETMOE_POOL``, plan rank = ``RANK``), joins the process group (NCCL on CUDA,
gloo on CPU), builds the plan's groups and trains. ``python -m hetmoe_trainer align
...`` runs the numerical-alignment tool instead.

Exit codes (``WorkerExit``): 0 done; 78 the plan, arguments or environment are
invalid (one log line says why; restarting cannot help); 86 a rank straggled
persistently (``progress.json`` names its node); 87 anomalies persisted across
rollbacks; anything else (1, or 137 from an injected crash) is an ordinary failure
to restart from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from pydantic import ValidationError

from hetmoe_operator.plan import Plan, WorkerExit
from hetmoe_trainer.anomaly import Fault
from hetmoe_trainer.distributed import (
    PlanError,
    build_context,
    init_default_group,
    pick_device,
    plan_rank_from_env,
    validate_plan,
)
from hetmoe_trainer.progress import LAUNCH_ID_ENV
from hetmoe_trainer.stop import stop_on_signals
from hetmoe_trainer.termination import record_termination

log = logging.getLogger("hetmoe_trainer")

FAULT_ENV = "HETMOE_INJECT_FAULT"
SLOWDOWN_ENV = "HETMOE_SIMULATED_SLOWDOWN"
"""Set by local mode only: emulate a slower accelerator grade on a CPU."""


def simulated_slowdown(environ: Mapping[str, str]) -> float:
    """The simulated-grade slowdown factor from ``environ`` (1.0 when unset)."""
    text = environ.get(SLOWDOWN_ENV, "").strip()
    if not text:
        return 1.0
    try:
        factor = float(text)
    except ValueError:
        raise ValueError(f"{SLOWDOWN_ENV}={text!r} is not a number") from None
    if not 1.0 <= factor <= 100.0:
        raise ValueError(f"{SLOWDOWN_ENV}={text!r} must be between 1 and 100")
    return factor


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise PlanError(f"bad arguments: {message}")


def grade_peaks(text: str) -> dict[str, float]:
    """``A=370,D=989`` -> {"A": 370e12, "D": 989e12} (FLOP/s)."""
    peaks = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        grade, _, value = item.partition("=")
        try:
            tflops = float(value)
        except ValueError:
            tflops = 0.0
        if not grade or not tflops > 0:
            raise argparse.ArgumentTypeError(
                f"{item!r}: expected GRADE=TFLOPS with a positive number, e.g. A=370"
            )
        peaks[grade] = tflops * 1e12
    return peaks


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    parser = _Parser(prog="python -m hetmoe_trainer", description="hetmoe MoE trainer worker")
    parser.add_argument("--plan", type=Path, required=True, help="plan JSON written by the planner")
    parser.add_argument(
        "--checkpoint-dir", type=Path, required=True, help="shared checkpoint directory"
    )
    parser.add_argument(
        "--checkpoint-interval", type=int, default=100, help="steps between checkpoints"
    )
    parser.add_argument("--keep-checkpoints", type=int, default=3, help="complete checkpoints kept")
    parser.add_argument(
        "--sync-checkpoint", action="store_true", help="save synchronously (no async)"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="base port: rank serves on base + LOCAL_RANK; 0 = off",
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=0.0, help="device peak for MFU; 0 = measure"
    )
    parser.add_argument(
        "--grade-peak-tflops",
        type=grade_peaks,
        default={},
        metavar="GRADE=TFLOPS,...",
        help="datasheet bf16 peak per grade (the operator passes its catalog's): the MFU "
        "denominator on CUDA, summed over the plan's ranks",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="compute dtype; auto = bf16 on CUDA, fp32 on CPU (parameters are always fp32)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads; 0 = leave as set"
    )
    parser.add_argument(
        "--max-rollbacks", type=int, default=3, help="rollbacks to one checkpoint allowed"
    )
    parser.add_argument(
        "--grad-overlap",
        choices=("auto", "on", "off"),
        default="auto",
        help="reduce gradient buckets during backward; auto = on for CUDA, off on CPU",
    )
    parser.add_argument(
        "--grad-bucket-mb", type=float, default=25.0, help="gradient all-reduce bucket size, MiB"
    )
    parser.add_argument(
        "--hang-timeout",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="exit with 89 (hung) when a step takes longer than this; 0 = no watchdog",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="regional torch.compile of each layer's attention half and dense/shared FFN "
        "(costs compile time at start and after every restart)",
    )
    parser.add_argument(
        "--inject-fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="test hook, e.g. kind=nan,step=5,rank=1 (also $HETMOE_INJECT_FAULT, ';'-separated)",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if args.grad_bucket_mb <= 0:
        raise PlanError("--grad-bucket-mb must be positive")
    for name in ("checkpoint_interval", "keep_checkpoints"):
        if getattr(args, name) < 1:
            raise PlanError(f"--{name.replace('_', '-')} must be at least 1")
    return args


def _load_plan(path: Path) -> Plan:
    try:
        plan = Plan.from_json(path.read_text())
    except OSError as error:
        raise PlanError(f"cannot read plan {path}: {error.strerror}") from None
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise PlanError(f"invalid plan {path}: {where}: {first['msg']}") from None
    validate_plan(plan)
    return plan


def _config_error(error: Exception) -> None:
    """Say it in the log and, for the pod's status, in the termination log."""
    log.error("configuration error: %s", error)
    record_termination(f"configuration error: {error}")


def main(argv: list[str] | None = None) -> int:
    """Run one worker; returns its exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["align"]:
        from hetmoe_trainer.align import main as align_main

        return align_main(argv[1:])
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s rank{os.environ.get('RANK', '0')} %(levelname)s %(name)s: %(message)s",
    )
    try:
        args = parse_args(argv)
        logging.getLogger().setLevel(args.log_level.upper())
        plan = _load_plan(args.plan)
        specs = [*args.inject_fault, *filter(None, os.environ.get(FAULT_ENV, "").split(";"))]
        faults = tuple(Fault.parse(spec) for spec in specs)
        plan_rank = plan_rank_from_env(plan, os.environ)
        slowdown = simulated_slowdown(os.environ)
    except (PlanError, ValueError) as error:
        _config_error(error)
        return WorkerExit.CONFIG_ERROR
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(int(os.environ.get("LOCAL_RANK", "0")), args.dtype)
    init_default_group(device.backend)
    try:
        context = build_context(plan, plan_rank, device)
    except PlanError as error:
        _config_error(error)
        dist.destroy_process_group()
        return WorkerExit.CONFIG_ERROR
    # Imported only now: it pulls in DCP (and sympy), which configuration errors need not wait for.
    from hetmoe_trainer.loop import Trainer, TrainerOptions

    options = TrainerOptions(
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_interval=args.checkpoint_interval,
        keep_checkpoints=args.keep_checkpoints,
        async_checkpoint=not args.sync_checkpoint,
        metrics_port=args.metrics_port + int(os.environ.get("LOCAL_RANK", "0"))
        if args.metrics_port
        else 0,
        faults=faults,
        peak_flops=args.peak_tflops * 1e12,
        grade_peak_flops=args.grade_peak_tflops,
        max_rollbacks=args.max_rollbacks,
        restart_count=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        launch_id=os.environ.get(LAUNCH_ID_ENV, ""),
        simulated_slowdown=slowdown,
        overlap_grad_sync={"auto": None, "on": True, "off": False}[args.grad_overlap],
        grad_bucket_bytes=max(1, int(args.grad_bucket_mb * (1 << 20))),
        compile=args.compile,
        hang_timeout_s=args.hang_timeout,
    )
    try:
        trainer = Trainer(context, options)
    except PlanError as error:  # e.g. --compile with a plan that splits the backward
        _config_error(error)
        dist.destroy_process_group()
        return WorkerExit.CONFIG_ERROR
    with stop_on_signals(trainer.stop):
        code = trainer.run()
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
