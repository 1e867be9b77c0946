"""Prometheus metrics of one worker, served with ``/progress`` on a per-rank port.

Every rank serves ``/metrics`` on ``--metrics-port + LOCAL_RANK`` (several ranks
share a node), so a per-pod scrape config or PodMonitor sees every rank; plan rank
0 additionally serves ``/progress`` (see :mod:`progress`). A registry per trainer,
not the process-global default, keeps tests and in-process runs independent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from hetmoe_operator.api.model import ModelArchitecture

PHASES = ("data", "forward", "backward", "all_to_all", "grad_sync", "optimizer", "checkpoint")
"""Values of the ``phase`` label of ``hetmoe_step_seconds``. ``all_to_all`` is the
expert-parallel exchange time taken out of forward and backward (0 without EP)."""


class TrainerMetrics:
    """The trainer's metric families, labelled by plan rank and stage."""

    def __init__(self, plan_rank: int, stage: int) -> None:
        self.registry = CollectorRegistry()
        labels = {"rank": str(plan_rank), "stage": str(stage)}
        names = list(labels)

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, [*names, *extra], registry=self.registry)

        self._labels = labels
        self.tokens_per_second = gauge(
            "hetmoe_tokens_per_second", "Global training tokens per second"
        )
        self.step_seconds = gauge(
            "hetmoe_step_seconds", "Wall time of the last step by phase", ("phase",)
        )
        self.loss = gauge("hetmoe_loss", "Global mean language-model loss of the last step")
        self.grad_norm = gauge("hetmoe_grad_norm", "Global gradient norm before clipping")
        self.learning_rate = gauge("hetmoe_learning_rate", "Learning rate of the last step")
        self.step = gauge("hetmoe_step", "Optimizer steps completed")
        self.anomalies = gauge(
            "hetmoe_anomalies",
            "Anomalies since the run began, by kind (kind=skipped counts skipped steps); "
            "a gauge because the counts are restored from checkpoints",
            ("kind",),
        )
        self.expert_load_max = gauge(
            "hetmoe_expert_load_max", "Max tokens per expert in the last step", ("layer",)
        )
        self.expert_load_mean = gauge(
            "hetmoe_expert_load_mean", "Mean tokens per expert in the last step", ("layer",)
        )
        self.checkpoint_blocking = gauge(
            "hetmoe_checkpoint_blocking_seconds", "Seconds training was blocked by the last save"
        )
        self.restarts = gauge("hetmoe_restarts", "torchrun restarts of this worker group")
        self.straggler_score = gauge(
            "hetmoe_straggler_score", "Step time / median step time of this rank"
        )
        self.mfu = gauge("hetmoe_mfu", "Model FLOPs utilisation estimate (0-1)")

    def labels(self, metric: Gauge, **extra: str) -> Gauge:
        """The child of ``metric`` for this rank (plus ``extra`` labels)."""
        return metric.labels(**self._labels, **extra)

    def exposition(self) -> bytes:
        """Text exposition of the registry."""
        return generate_latest(self.registry)


Route = Callable[[], tuple[bytes, str]]


class MetricsServer:
    """A small threaded HTTP server: ``/metrics`` plus optional extra routes."""

    def __init__(self, port: int, routes: dict[str, Route]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = routes.get(self.path.split("?", 1)[0])
                if route is None:
                    self.send_error(404)
                    return
                body, content_type = route()
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return

        self._server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


def metrics_route(metrics: TrainerMetrics) -> Route:
    """The ``/metrics`` route of a registry."""
    return lambda: (metrics.exposition(), CONTENT_TYPE_LATEST)


def measure_matmul_peak(
    device: torch.device, dtype: torch.dtype, size: int = 1024, repeats: int = 5
) -> float:
    """Achievable FLOP/s of a square matmul on this device: the MFU denominator.

    Measured, not taken from a datasheet, so MFU on CPU and on unlisted grades is
    still meaningful; the best of ``repeats`` timings is used.
    """
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def mfu_denominator(
    grades: Sequence[str],
    device_type: str,
    grade_peak_flops: Mapping[str, float],
    device_peak: Callable[[], float],
) -> float:
    """Peak FLOP/s of the whole job, the denominator of its MFU.

    On CUDA with every rank's grade in the catalog (``grade_peak_flops``, which the
    operator passes from its device catalog): the sum of the ranks' datasheet bf16
    peaks, as MFU is usually reported, and right for a job whose ranks run on
    different grades. Otherwise ``device_peak()`` (a given figure, or a matmul measured
    on this device, which is what a CPU or an unlisted device can offer) for every
    rank; it is not called when the catalog answers, so GPUs skip the measurement.
    """
    if device_type == "cuda" and grades and all(g in grade_peak_flops for g in grades):
        return sum(grade_peak_flops[g] for g in grades)
    return device_peak() * len(grades)


def flops_per_token(arch: ModelArchitecture, sequence_length: int) -> float:
    """Training FLOPs per token: 6 x active parameters + causal attention scores (fwd + bwd).

    The input embedding is a lookup, not a matmul, so it is left out.
    """
    attention = (
        6
        * arch.num_hidden_layers
        * sequence_length
        * arch.num_attention_heads
        * arch.resolved_head_dim
    )
    return 6 * (arch.active_params - arch.embedding_params) + attention
