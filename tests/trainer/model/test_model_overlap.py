"""Each expert-parallel all-to-all is in flight while a half of the shared expert computes.

The planner's cost model hides every pass's exchanges behind the shared-expert
compute. Two gloo processes run one MoE layer while the all-to-all calls and work
waits are logged next to the shared expert's forward calls and its backward
(begin: gradient at its output; end: gradient at its input). The order of events,
not timing, is checked, so a regression to blocking exchanges (or to computing the
shared expert outside the exchanges) fails however fast the machine is.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from test_model_dispatch import gloo_group, spawn

from hetmoe_operator.api.model import PRESETS
from hetmoe_operator.api.training import TrainingConfig
from hetmoe_operator.plan import StagePlan
from hetmoe_trainer.model import ExpertParallel, Stage, build_stage

LAYER = 2
RANK_EXPERTS = [[0, 1, 2, 3], [4, 5, 6, 7]]

FORWARD = [
    "counts start",
    "counts wait",
    "start",  # dispatch
    "shared forward",
    "wait",
    "start",  # combine
    "shared forward",
    "wait",
]
BACKWARD = [
    "start",  # combine transposed
    "shared backward begins",
    "shared backward ends",
    "wait",
    "start",  # dispatch transposed
    "shared backward begins",
    "shared backward ends",
    "wait",
]


class _LoggedWork:
    """A collective's work handle that logs when it is waited for."""

    def __init__(self, work: Any, events: list[str], name: str) -> None:
        self._work, self._events, self._name = work, events, name

    def wait(self, *args: Any) -> Any:
        self._events.append(f"{self._name}wait")
        return self._work.wait(*args)


def _log_exchanges(events: list[str]) -> None:
    """Log every ``all_to_all_single`` of this worker process (started or blocking)."""
    original = dist.all_to_all_single

    def logged(output: torch.Tensor, input: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        name = "counts " if input.dtype == torch.int64 else ""
        if not kwargs.get("async_op", False):
            events.append(f"{name}blocking")
            return original(output, input, *args, **kwargs)
        events.append(f"{name}start")
        return _LoggedWork(original(output, input, *args, **kwargs), events, name)

    dist.all_to_all_single = logged


def _log_shared_expert(stage: Stage, events: list[str]) -> None:
    shared = stage.moe_layers()[LAYER].shared_experts
    assert shared is not None
    shared.register_forward_hook(lambda *_: events.append("shared forward"))
    shared.register_full_backward_pre_hook(lambda *_: events.append("shared backward begins"))
    shared.register_full_backward_hook(lambda *_: events.append("shared backward ends"))


def _build(rank: int, recompute: bool) -> Stage:
    arch = PRESETS["tiny"]
    training = TrainingConfig(steps=2, global_batch_size=2, sequence_length=8, seed=5)
    plan = StagePlan(
        index=0,
        layer_start=LAYER,
        layer_end=LAYER + 1,
        has_embedding=False,
        has_head=False,
        recompute_activations=recompute,
    )
    ep = ExpertParallel(dist.group.WORLD, RANK_EXPERTS, rank)
    return build_stage(arch, plan, training, ep, device="cpu")


def _step(stage: Stage, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    stage.train()
    x = x.clone().requires_grad_()
    out = stage(x, step=1)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    assert x.grad is not None
    grads = {name: p.grad for name, p in stage.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def _worker(rank: int, world: int, port: int) -> None:
    with gloo_group(rank, world, port):
        events: list[str] = []
        _log_exchanges(events)
        x = torch.randn(1 + rank, 8, PRESETS["tiny"].hidden_size)  # uneven token counts

        plain = _build(rank, recompute=False)
        _log_shared_expert(plain, events)
        out = plain(x, step=1)
        assert events == FORWARD, events
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        assert events == FORWARD + BACKWARD, events

        # Five exchanges (counts, dispatch, combine, two transposes), all waited for.
        timer = plain.moe_layers()[LAYER].dispatcher.ep.timer
        assert timer.calls == 5 and timer.seconds > 0 and timer.in_flight_seconds > 0

        # Activation recompute re-runs the forward (exchanges and overlap included)
        # at the start of the layer's backward, gives the same results and counts
        # the routing statistics once.
        plain, recomputed = _build(rank, recompute=False), _build(rank, recompute=True)
        recomputed.load_state_dict(plain.state_dict())
        events.clear()
        _log_shared_expert(recomputed, events)
        want_out, want_xgrad, want_grads = _step(plain, x)
        events.clear()
        got_out, got_xgrad, got_grads = _step(recomputed, x)
        assert events == FORWARD + FORWARD + BACKWARD, events
        assert torch.equal(got_out, want_out)
        torch.testing.assert_close(got_xgrad, want_xgrad, rtol=1e-6, atol=1e-7)
        assert got_grads.keys() == want_grads.keys()
        for name, grad in want_grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)
        assert torch.equal(recomputed.pop_expert_load()[LAYER], plain.pop_expert_load()[LAYER])
        assert recomputed.moe_layers()[LAYER].pop_aux_losses() == (
            plain.moe_layers()[LAYER].pop_aux_losses()
        )


def test_exchanges_overlap_the_shared_expert_in_forward_backward_and_recompute():
    spawn(_worker, 2)
