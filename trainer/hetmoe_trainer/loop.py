"""The training loop: data -> pipeline forward/backward -> gradient sync -> judge -> update.

One step, identical on every rank:

1. take the step's global batch (the next ``global_batch_size`` stream samples, or a
   set-aside batch due for re-injection) and keep this replica's contiguous slice;
2. run the microbatches through the pipeline (:class:`StepRunner`);
3. sum gradients over each parameter's holders (:class:`GradientSync`; buckets
   whose gradients are final already left during backward, the rest go now);
4. one all-reduce over the world of ``[loss, grad-norm^2, non-finite flag, stop
   requests, per-rank ready time...]`` gives every rank the global loss, norm, step
   times and whether any rank was asked to stop (:mod:`hetmoe_trainer.stop`);
5. the anomaly detector decides (same inputs everywhere, so the same verdict):
   apply (clip, AdamW on this rank's ZeRO-1 share, broadcast to the other holders),
   skip (optimizer untouched), apply with a lowered LR, or roll back to the last
   checkpoint;
6. metrics, ``progress.json``, the per-step log, and a checkpoint every
   ``checkpoint_interval`` steps, or now if a rank was asked to stop (then the run
   ends with ``WorkerExit.STOPPED``).

Plan rank 0 appends one JSON line per step to ``<checkpoint dir>/train_log.jsonl``
(``step`` is the number of steps completed; after a resume a step may appear twice,
the last line wins).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from hetmoe_operator.plan import WAITING_FOR_PEERS_MARK, WorkerExit, replace_node_request
from hetmoe_trainer.anomaly import (
    Action,
    AnomalyDetector,
    Fault,
    FaultInjector,
    StragglerMonitor,
    Verdict,
)
from hetmoe_trainer.checkpoint import Checkpointer, training_state
from hetmoe_trainer.data import SampleStream, batch_tensors, build_source, replica_slice
from hetmoe_trainer.distributed import ParallelContext, PlanError, lost_a_peer
from hetmoe_trainer.gradsync import DEFAULT_BUCKET_BYTES, GradientSync
from hetmoe_trainer.metrics import (
    MetricsServer,
    TrainerMetrics,
    flops_per_token,
    measure_matmul_peak,
    metrics_route,
    mfu_denominator,
)
from hetmoe_trainer.model import build_stage
from hetmoe_trainer.optim import (
    ShardedParameters,
    build_optimizer,
    clip_gradients,
    set_learning_rate,
)
from hetmoe_trainer.pipeline import StepRunner
from hetmoe_trainer.progress import ANOMALY_KINDS, ProgressReporter
from hetmoe_trainer.schedule import learning_rate
from hetmoe_trainer.stop import StopRequest
from hetmoe_trainer.termination import record_termination
from hetmoe_trainer.watchdog import HangWatchdog, exit_hung

log = logging.getLogger(__name__)

TRAIN_LOG = "train_log.jsonl"
PROGRESS = "progress.json"


_EXIT_STATES = {
    WorkerExit.STOPPED: "stopped",
    WorkerExit.REPLACE_NODE: "straggler",
    WorkerExit.ROLLBACK_EXHAUSTED: "rollback-exhausted",
}
"""``progress.json`` state for each way training can end early."""


class TrainingExit(Exception):
    """Ends training with a :class:`WorkerExit` code the operator acts on."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class TrainerOptions:
    """Worker settings that are not part of the plan (they come from the command line)."""

    checkpoint_dir: Path
    checkpoint_interval: int = 100
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    metrics_port: int = 0
    """0: no HTTP server; otherwise this exact port (the CLI adds LOCAL_RANK)."""
    faults: tuple[Fault, ...] = ()
    peak_flops: float = 0.0
    """Per-device peak FLOP/s for MFU; 0 measures a matmul at start."""
    grade_peak_flops: Mapping[str, float] = field(default_factory=dict)
    """Datasheet bf16 peak FLOP/s per grade (the operator's catalog): the MFU
    denominator on CUDA (:func:`~hetmoe_trainer.metrics.mfu_denominator`)."""
    max_rollbacks: int = 3
    """Rollbacks to the same checkpoint before giving up (ROLLBACK_EXHAUSTED)."""
    restart_count: int = 0
    """torchrun's TORCHELASTIC_RESTART_COUNT."""
    launch_id: str = ""
    """The launch wrapper's ``$HETMOE_LAUNCH_ID``: counts in-place restarts in progress."""
    simulated_slowdown: float = 1.0
    """Local mode's simulated grade: stretch this rank's compute by this factor."""
    overlap_grad_sync: bool | None = None
    """Launch each gradient bucket's all-reduce during backward, once it is final.

    None (auto): on for CUDA, off on CPU, where gloo's reduction threads compete with
    backward for the same cores (bench/trainer/bench_gradsync.py measured it slower).
    """
    grad_bucket_bytes: int = DEFAULT_BUCKET_BYTES
    """Gradient bytes per all-reduce bucket (smaller: earlier launches, more calls)."""
    zero: bool = True
    """ZeRO-1: AdamW state sharded over each parameter's holders (:class:`ShardedParameters`),
    as the planner's memory model assumes; off keeps full state on every rank."""
    hang_timeout_s: float = 0.0
    """Seconds a step may take before the worker exits with ``WorkerExit.HUNG``
    (:mod:`hetmoe_trainer.watchdog`); 0 turns the watchdog off."""
    compile: bool = False
    """Regional ``torch.compile`` of every layer (:meth:`Stage.compile_regions`).

    Off by default: compiling costs time at every (re)start, and on CPU it did not
    pay for itself in bench/trainer/bench_throughput.py (see its README)."""


def simulated_delay(compute_seconds: float, slowdown: float) -> float:
    """Extra seconds that make ``compute_seconds`` of work take ``slowdown`` times as long.

    Local mode runs every simulated grade on the same CPU; waiting before the gradient
    sync makes a "slow" rank hold up its peers exactly as a slower device would, so the
    planner's speed-proportional batch split can be seen working.
    """
    return max(slowdown - 1.0, 0.0) * max(compute_seconds, 0.0)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass
class StepTimes:
    """Wall seconds of one step's phases on this rank."""

    phases: dict[str, float] = field(default_factory=dict)

    def add(self, phase: str, seconds: float) -> None:
        """Accumulate ``seconds`` into ``phase``."""
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds


class Trainer:
    """Trains one rank's share of the plan; ``run()`` returns a WorkerExit code."""

    def __init__(
        self, context: ParallelContext, options: TrainerOptions, stop: StopRequest | None = None
    ) -> None:
        """``stop``: set by a signal handler (:func:`~hetmoe_trainer.stop.stop_on_signals`);
        every rank stops after the first step at which any rank had it set."""
        plan, me = context.plan, context.me
        if options.compile and plan.splits_backward:
            raise PlanError(
                f"regional torch.compile cannot run under the {plan.schedule_name} schedule "
                "(torch does not split a compiled region's backward into input and weight "
                "gradients): drop --compile, or plan 1F1B or interleaved 1F1B"
            )
        training = plan.training
        self.context = context
        self.options = options
        self.stop = stop if stop is not None else StopRequest()
        self.watchdog = HangWatchdog(
            options.hang_timeout_s, on_hang=functools.partial(exit_hung, plan_rank=me.rank)
        )
        self.training = training
        self.total_steps = training.total_steps
        device = context.device.device
        self.stage = build_stage(
            plan.model,
            plan.stages_at(me.stage),
            training,
            context.expert_parallel,
            device=device,
            dtype=torch.float32,
        )
        if options.compile:
            self.stage.compile_regions()
        self.runner = StepRunner(self.stage, context)
        self.sync = GradientSync(
            self.stage,
            context,
            options.grad_bucket_bytes,
            overlap=(
                device.type == "cuda"
                if options.overlap_grad_sync is None
                else options.overlap_grad_sync
            ),
            accumulations=context.replica.num_microbatches,
        )
        self.shards = ShardedParameters(self.stage, context, enabled=options.zero)
        self.optimizer = build_optimizer(self.shards.named, training.weight_decay)
        self.source = build_source(
            training.data, plan.model.vocab_size, training.sequence_length, training.seed
        )
        self.my_slice = replica_slice(list(plan.replicas), me.dp_index)
        self.stream = SampleStream()
        self.detector = AnomalyDetector(training.anomaly, training.seed)
        self.stragglers = StragglerMonitor(
            training.anomaly.straggler_factor, training.anomaly.straggler_patience
        )
        self.faults = FaultInjector(list(options.faults), me.rank, options.restart_count)
        options.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.checkpointer = Checkpointer(
            options.checkpoint_dir,
            context.checkpoint_group,
            keep=options.keep_checkpoints,
            use_async=options.async_checkpoint,
        )
        self.rollbacks: dict[int, int] = {}
        self._save_due = False
        """A checkpoint interval passed during a skip streak: save at the next good step."""
        self.step = 0
        self.history: list[dict] = []
        """Per-step records (also in train_log.jsonl on plan rank 0)."""

        self.metrics = TrainerMetrics(me.rank, me.stage)
        self.metrics.labels(self.metrics.restarts).set(options.restart_count)
        self.is_reporter = me.rank == 0
        self.progress = (
            ProgressReporter(
                options.checkpoint_dir / PROGRESS,
                self.total_steps,
                options.restart_count,
                options.launch_id,
            )
            if self.is_reporter
            else None
        )
        self._flops_per_token = flops_per_token(plan.model, training.sequence_length)
        self._peak_total = mfu_denominator(
            [rank.grade for rank in plan.ranks],
            device.type,
            options.grade_peak_flops,
            lambda: options.peak_flops or measure_matmul_peak(device, context.device.compute_dtype),
        )
        self.server: MetricsServer | None = None
        if options.metrics_port:
            routes = {"/metrics": metrics_route(self.metrics)}
            if self.progress is not None:
                routes["/progress"] = self.progress.route
            self.server = MetricsServer(options.metrics_port, routes)

    # -- state -----------------------------------------------------------------

    def _trainer_json(self) -> str:
        return json.dumps(
            {
                "step": self.step,
                "stream": self.stream.state_dict(),
                "detector": self.detector.state_dict(),
                "rollbacks": self.rollbacks,
            }
        )

    def state(self) -> dict[str, object]:
        """Everything a checkpoint holds for this rank (tensors are live, not copies)."""
        return training_state(
            self.stage, self.optimizer, self._trainer_json(), self.context.me.rank, self.shards
        )

    def load(self, path: Path) -> None:
        """Restore model, optimizer, counters and RNG from the checkpoint at ``path``."""
        state = self.state()
        self.checkpointer.load(path, state)
        trainer = json.loads(str(state["trainer"]))
        self.step = int(trainer["step"])
        self.stream.load_state_dict(trainer["stream"])
        self.detector.load_state_dict(trainer["detector"])
        self.rollbacks = {int(k): int(v) for k, v in trainer["rollbacks"].items()}
        rng = state.get(f"rng.{self.context.me.rank}")
        if isinstance(rng, torch.Tensor):
            torch.set_rng_state(rng)
        log.info(
            "resumed from %s at step %d, sample %d", path.name, self.step, self.stream.consumed
        )

    def save(self) -> float:
        """Checkpoint the current step; returns seconds blocked."""
        blocked = self.checkpointer.save(self.step, self.state())
        self.metrics.labels(self.metrics.checkpoint_blocking).set(blocked)
        return blocked

    # -- the loop ----------------------------------------------------------------

    def run(self) -> int:
        """Resume if possible, train to the end, return the exit code."""
        with self.watchdog:
            return self._run()

    def _run(self) -> int:
        try:
            resume = self.checkpointer.find_resume_point()
            if resume is not None:
                self.load(resume)
                self._report_resumed()
            while self.step < self.total_steps:
                self.train_step()
            self.watchdog.beat("the final checkpoint")
            if self.checkpointer.last_step != self.step:
                self.save()
            self.checkpointer.wait()
            self._report(state="finished", last_checkpoint_step=self.checkpointer.last_step)
            return WorkerExit.OK
        except TrainingExit as end:
            if end.code == WorkerExit.STOPPED:
                log.warning("%s", end)
            else:
                log.error("%s", end)
            record_termination(str(end), self.context.me.rank)
            self.checkpointer.wait()
            self._report(
                state=_EXIT_STATES[end.code],
                anomalies=self.detector.counts,
                events=self.detector.events,
                last_checkpoint_step=self.checkpointer.last_step,
            )
            return end.code
        except PlanError:
            raise  # a configuration error: the entry point reports it (exit 78)
        except Exception as error:
            self._record_crash(error)
            raise
        finally:
            if self.server is not None:
                self.server.close()

    def _record_crash(self, error: Exception) -> None:
        """Say why this rank crashed, for the pod's status. A rank whose collective broke
        because another rank died says it was waiting for others, so the operator names
        the rank that died first, not the ones that fell with it."""
        phase, collective = self.watchdog.where()
        mark = f" {WAITING_FOR_PEERS_MARK}" if collective or lost_a_peer(error) else ""
        detail = next(iter(str(error).splitlines()), "")
        record_termination(
            f"{type(error).__name__} in {phase}{mark}: {detail}", self.context.me.rank
        )

    def _next_batch(self) -> tuple[list[int], bool]:
        due = self.detector.due_batch(self.step)
        if due is not None:
            return due, True
        return self.stream.take(self.training.global_batch_size), False

    def train_step(self) -> None:
        """One optimizer step (or a skipped one, or a rollback)."""
        self.watchdog.beat(f"step {self.step + 1}: data")
        self.faults.crash(self.step, "step")
        self.faults.terminate(self.step)
        times = StepTimes()
        start = time.perf_counter()
        position = self.stream.consumed
        samples, reinjected = self._next_batch()
        mine = samples[self.my_slice]
        inputs = targets = None
        if self.runner.is_first or self.runner.is_last:
            inputs, targets = batch_tensors(self.source, mine, self.context.device.device)
        self.runner.loss_scale = self.faults.loss_scale(self.step, samples)
        self.runner.compute.nan_gradients = self.faults.nan_gradients(self.step)
        times.add("data", time.perf_counter() - start)

        phase = time.perf_counter()
        self.watchdog.phase(f"step {self.step + 1}: forward/backward")
        self.faults.hang(self.step)
        compute = self.runner.compute
        before = (compute.forward_seconds, compute.forward_exchange_seconds)
        exchanged = compute.exchanges.seconds
        local_loss = self.runner.run(inputs, targets, self.step)
        self.runner.loss_scale = 1.0
        self.runner.compute.nan_gradients = False
        forward = compute.forward_seconds - before[0]
        forward_exchange = compute.forward_exchange_seconds - before[1]
        exchange = compute.exchanges.seconds - exchanged
        # The EP exchanges run inside forward and backward; report them as their own
        # phase so forward + backward + all_to_all is still the pipeline's wall time.
        times.add("forward", forward - forward_exchange)
        times.add("backward", time.perf_counter() - phase - forward - (exchange - forward_exchange))
        times.add("all_to_all", exchange)
        self.faults.delay(self.step)
        # Backward is about twice the forward FLOPs; the measured backward phase would
        # also count pipeline waits, which a slower device does not stretch.
        time.sleep(simulated_delay(3 * forward, self.options.simulated_slowdown))
        ready = time.perf_counter() - start

        phase = time.perf_counter()
        self.watchdog.phase(f"step {self.step + 1}: gradient sync", collective=True)
        self.sync.sync()
        times.add("grad_sync", time.perf_counter() - phase)

        world = self.context.world_size
        stats = torch.zeros(4 + world, dtype=torch.float64, device=self.context.device.device)
        norm_sq = self.sync.local_norm_sq()
        stats[0] = local_loss.double()
        stats[1] = norm_sq.double()
        stats[2] = float(not (torch.isfinite(local_loss) and torch.isfinite(norm_sq)))
        # A stop request rides on this all-reduce: every rank learns of it after the
        # same step, without a collective of its own.
        stats[3] = float(self.stop.requested)
        stats[4 + self.context.rank] = ready
        self.watchdog.phase(f"step {self.step + 1}: statistics all-reduce", collective=True)
        dist.all_reduce(stats)
        values = stats.tolist()
        loss, grad_norm = values[0], math.sqrt(values[1]) if values[1] >= 0 else math.nan
        stopping = values[3] > 0
        ready_times = values[4 : 4 + world]
        verdict = self.detector.judge(
            self.step,
            loss,
            grad_norm,
            nonfinite=values[2] > 0,
            reinjected=reinjected,
            position=position,
        )
        loads = self._expert_loads()

        phase = time.perf_counter()
        self.watchdog.phase(f"step {self.step + 1}: optimizer")
        lr = learning_rate(self.training.lr, self.step, self.total_steps) * verdict.lr_factor
        if verdict.action in (Action.APPLY, Action.LOWER_LR):
            clip_gradients(self.sync.params, grad_norm, self.training.grad_clip)
            set_learning_rate(self.optimizer, lr)
            self.checkpointer.wait_staged()
            self.shards.attach_grads()
            self.optimizer.step()
            self.shards.broadcast()
            if self.training.balancing == "bias":
                self.stage.update_balancing_bias(loads)
        elif verdict.action is Action.SKIP and verdict.reason == "spike":
            due = self.detector.set_batch_aside(self.step, samples)
            log.warning(
                "step %d: loss spike %.4f, batch set aside until step %d", self.step, loss, due
            )
        elif verdict.action is Action.SKIP:
            log.warning("step %d: non-finite loss/gradient, update skipped", self.step)
        self.optimizer.zero_grad(set_to_none=True)
        self.stage.zero_grad(set_to_none=True)
        times.add("optimizer", time.perf_counter() - phase)

        if verdict.action is Action.ROLLBACK:
            self._rollback(verdict)
            if stopping:
                raise self._stopped("after rolling back; the checkpoint rolled back to is kept")
            return
        self.step += 1
        scores = self.stragglers.update(ready_times)
        self._record(verdict, loss, grad_norm, lr, loads, scores, ready_times, times, start)
        self._check_stragglers(scores)

        if self.step % self.options.checkpoint_interval == 0:
            self._save_due = True
        # Never checkpoint inside a streak of skipped steps: a rollback must return to
        # weights from before the anomalies, or each rollback would land on a newer
        # checkpoint and the rollback budget could never run out.
        if self._save_due and not self.detector.consecutive_skips and self.step < self.total_steps:
            self._save_due = False
            phase = time.perf_counter()
            self.save()
            self.faults.crash(self.step, "save")
            times.add("checkpoint", time.perf_counter() - phase)
        self.checkpointer.poll()
        if stopping and self.step < self.total_steps:
            self._stop_with_checkpoint()

    def _stop_with_checkpoint(self) -> None:
        """Every rank saw a stop request this step: checkpoint it and end with
        ``WorkerExit.STOPPED``."""
        raise self._stopped(self._save_final_step())

    def _save_final_step(self) -> str:
        """Checkpoint the step the run ends at, unless that would break a rollback (as
        above); says which happened."""
        if self.detector.consecutive_skips:
            return (
                f"inside a streak of skipped steps, so the last checkpoint "
                f"(step {self.checkpointer.last_step}) is kept for a rollback"
            )
        if self.checkpointer.last_step != self.step:
            self.save()
        return f"checkpoint saved at step {self.step}"

    def _stopped(self, detail: str) -> TrainingExit:
        by = self.stop.signal.name if self.stop.signal else "another rank"
        return TrainingExit(
            WorkerExit.STOPPED, f"stopped on request ({by}) at step {self.step}: {detail}"
        )

    def _expert_loads(self) -> dict[int, torch.Tensor]:
        """Tokens per expert and layer this step, summed over the stage's replicas."""
        loads = self.stage.pop_expert_load()
        if not loads:
            return loads
        layers = sorted(loads)
        stacked = torch.stack([loads[i] for i in layers])
        if len(self.context.dense_holders) > 1:
            dist.all_reduce(stacked, group=self.context.dp_group)
        return {layer: stacked[n] for n, layer in enumerate(layers)}

    def _rollback(self, verdict: Verdict) -> None:
        start = self.detector.streak_start
        end = self.stream.consumed
        self.checkpointer.wait()
        path = self.checkpointer.find_resume_point()
        counts, events = dict(self.detector.counts), list(self.detector.events)
        rollbacks = dict(self.rollbacks)
        skipped = (start if start is not None else end, end)
        # Loading the checkpoint restores its skip list; ranges found bad since then
        # (earlier rollbacks to the same checkpoint) must stay skipped too.
        skip_ranges = [*self.stream.skip_ranges, skipped]
        target = -1
        if path is not None:
            self.load(path)
            target = self.step
        for bad in skip_ranges:
            self.stream.skip(*bad)
        self.detector.counts, self.detector.events = counts, events
        rollbacks[target] = rollbacks.get(target, 0) + 1
        if rollbacks[target] > self.options.max_rollbacks:
            ranges = ", ".join(f"[{a}, {b})" for a, b in self.stream.skip_ranges)
            raise TrainingExit(
                WorkerExit.ROLLBACK_EXHAUSTED,
                f"{rollbacks[target]} rollbacks to step {max(target, 0)} "
                f"did not clear the anomalies ({verdict.reason}); "
                f"sample ranges skipped: {ranges}",
            )
        self.rollbacks = rollbacks
        self._save_due = False
        self.detector.end_streak()
        self.detector.set_aside = [
            (due, s)
            for due, s in self.detector.set_aside
            if not any(skipped[0] <= i < skipped[1] for i in s)
        ]
        where = (
            f"checkpoint step {self.step}"
            if path is not None
            else "current weights (no checkpoint yet)"
        )
        self.detector.record(
            self.step,
            "rollback",
            f"{verdict.reason}: back to {where}, samples {skipped[0]}..{skipped[1]} skipped",
        )
        log.error(
            "rollback (%s): back to %s; samples [%d, %d) skipped", verdict.reason, where, *skipped
        )
        self._report(anomalies=self.detector.counts, events=self.detector.events)

    def _check_stragglers(self, scores: list[float]) -> None:
        straggler = self.stragglers.persistent()
        if straggler is None:
            return
        plan_rank = self.context.process_of.index(straggler)
        seat = self.context.plan.ranks[plan_rank]
        info = {
            "plan_rank": plan_rank,
            "pool": seat.pool,
            "node_slot": seat.node_slot,
            "local_rank": seat.local_rank,
            "score": scores[straggler],
        }
        self.detector.record(self.step, "straggler", json.dumps(info))
        self._report(straggler=info, anomalies=self.detector.counts, events=self.detector.events)
        kept = self._save_final_step()  # the job is healthy, only slow: keep its steps
        raise TrainingExit(
            WorkerExit.REPLACE_NODE,
            f"rank {plan_rank} ({seat.pool} node {seat.node_slot}) straggled for "
            f"{self.stragglers.patience} steps (score {scores[straggler]:.2f}); {kept}; "
            + replace_node_request(seat.pool, seat.node_slot),
        )

    # -- reporting -----------------------------------------------------------------

    def _record(
        self,
        verdict: Verdict,
        loss: float,
        grad_norm: float,
        lr: float,
        loads: dict[int, torch.Tensor],
        scores: list[float],
        ready: list[float],
        times: StepTimes,
        start: float,
    ) -> None:
        elapsed = time.perf_counter() - start
        tokens_per_step = self.training.tokens_per_step
        tokens_per_s = tokens_per_step / elapsed
        m = self.metrics
        m.labels(m.step).set(self.step)
        m.labels(m.tokens_per_second).set(tokens_per_s)
        m.labels(m.learning_rate).set(lr)
        m.labels(m.grad_norm).set(grad_norm)
        m.labels(m.loss).set(loss)
        m.labels(m.straggler_score).set(scores[self.context.rank])
        m.labels(m.mfu).set(tokens_per_s * self._flops_per_token / self._peak_total)
        for name, seconds in times.phases.items():
            m.labels(m.step_seconds, phase=name).set(seconds)
        for kind in ANOMALY_KINDS:
            m.labels(m.anomalies, kind=kind).set(self.detector.counts.get(kind, 0))
        for layer, load in loads.items():
            counts = load.double()
            m.labels(m.expert_load_max, layer=str(layer)).set(counts.max().item())
            m.labels(m.expert_load_mean, layer=str(layer)).set(counts.mean().item())

        record = {
            "step": self.step,
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "action": verdict.action.value,
            "consumed_samples": self.stream.consumed,
            "tokens_per_s": tokens_per_s,
            "seconds": elapsed,
            "phases": dict(times.phases),
            "overlapped_buckets": self.sync.launched_in_backward,
            "restart_count": self.options.restart_count,
            "time": time.time(),
        }
        self.history.append(record)
        if not self.is_reporter:
            return
        with (self.options.checkpoint_dir / TRAIN_LOG).open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        per_stage: dict[str, float] = {}
        for process, seconds in enumerate(ready):
            stage = str(self.context.plan.ranks[self.context.process_of.index(process)].stage)
            per_stage[stage] = max(per_stage.get(stage, 0.0), seconds)
        remaining = self.total_steps - self.step
        self._report(
            step=self.step,
            tokens=self.step * tokens_per_step,
            consumed_samples=self.stream.consumed,
            loss=_finite_or_none(loss),
            grad_norm=_finite_or_none(grad_norm),
            lr=lr,
            tokens_per_s=tokens_per_s,
            eta_seconds=remaining * elapsed,
            last_checkpoint_step=self.checkpointer.last_step,
            anomalies=self.detector.counts,
            events=self.detector.events,
            stage_step_seconds=per_stage,
            phase_seconds=dict(times.phases),
        )

    def _report_resumed(self) -> None:
        """Progress as the checkpoint left it, before any new step: a job resumed at
        its last step trains nothing, and must not report step 0 and no loss."""
        window = self.detector.window
        self._report(
            step=self.step,
            tokens=self.step * self.training.tokens_per_step,
            consumed_samples=self.stream.consumed,
            loss=_finite_or_none(window[-1]) if window else None,
            last_checkpoint_step=self.checkpointer.last_step,
            anomalies=self.detector.counts,
            events=self.detector.events,
        )

    def _report(self, **fields: object) -> None:
        if self.progress is not None:
            self.progress.update(**fields)
