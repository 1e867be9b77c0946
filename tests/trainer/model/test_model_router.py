"""Router maths against hand computations: fp32 gate, renormalised top-k, losses, warmup."""

from __future__ import annotations

import math

import pytest
import torch

from hetmoe_trainer.model.router import Router


def _router(**overrides: object) -> Router:
    kwargs = {
        "hidden_size": 4,
        "num_experts": 4,
        "top_k": 2,
        "layer_id": 3,
        "seed": 11,
        "aux_loss_coef": 0.015,
        "z_loss_coef": 1e-4,
        "balancing": "aux-loss",
        "warmup_steps": 0,
    }
    kwargs.update(overrides)
    router = Router(**kwargs)  # type: ignore[arg-type]
    with torch.no_grad():
        router.weight.copy_(torch.arange(16, dtype=torch.float32).view(4, 4).sin())
    return router


def _hand_softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    return [e / sum(exps) for e in exps]


def test_gate_is_fp32_softmax_with_renormalised_top_k():
    router = _router().to(torch.bfloat16)
    x = torch.randn(2, 3, 4).to(torch.bfloat16)
    routing = router(x, step=0)
    assert routing.weights.dtype == torch.float32
    logits = x.float().flatten(0, 1) @ router.weight.float().t()
    for t in range(6):
        probs = _hand_softmax(logits[t].tolist())
        best = sorted(range(4), key=lambda e: -probs[e])[:2]
        assert sorted(routing.expert_ids[t].tolist()) == sorted(best)
        chosen = dict(zip(routing.expert_ids[t].tolist(), routing.weights[t].tolist(), strict=True))
        denominator = probs[best[0]] + probs[best[1]]
        for e in best:
            assert chosen[e] == pytest.approx(probs[e] / denominator, rel=1e-5)
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(6))


def test_aux_and_z_loss_match_hand_computation():
    router = _router()
    x = torch.randn(1, 5, 4, generator=torch.Generator().manual_seed(3))
    routing = router(x, step=0)
    logits = (x.flatten(0, 1) @ router.weight.t()).tolist()
    probs = [_hand_softmax(row) for row in logits]
    tokens, experts, k = 5, 4, 2
    slots = [0] * experts
    for row in routing.expert_ids.tolist():
        for e in row:
            slots[e] += 1
    aux = experts * sum(
        (slots[e] / (tokens * k)) * (sum(p[e] for p in probs) / tokens) for e in range(experts)
    )
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / tokens
    assert routing.aux_loss.item() == pytest.approx(0.015 * aux, rel=1e-5)
    assert routing.z_loss.item() == pytest.approx(1e-4 * z, rel=1e-5)
    assert routing.counts.tolist() == slots


def test_losses_are_off_in_eval_and_aux_off_in_bias_mode():
    x = torch.randn(1, 5, 4)
    router = _router().eval()
    routing = router(x, step=0)
    assert routing.aux_loss.item() == 0 and routing.z_loss.item() == 0
    biased = _router(balancing="bias")
    assert biased(x, step=0).aux_loss.item() == 0 and biased(x, step=0).z_loss.item() > 0


def test_bias_steers_selection_but_not_weights():
    router = _router(balancing="bias")
    x = torch.randn(1, 6, 4)
    assert router.expert_bias is not None
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    routing = router(x, step=0)
    assert (routing.expert_ids == 3).any(dim=-1).all()
    probs = torch.softmax(x.flatten(0, 1) @ router.weight.t(), dim=-1)
    top = probs.gather(-1, routing.expert_ids)
    torch.testing.assert_close(routing.weights, top / top.sum(-1, keepdim=True))
    router.update_bias(torch.tensor([5.0, 1.0, 1.0, 1.0]), rate=0.5)
    assert router.expert_bias.tolist() == [-0.5, 0.5, 0.5, 10.5]


def test_routing_warmup_blends_noise_into_signal():
    router = _router(warmup_steps=4)
    x = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(5))
    logits = x.float() @ router.weight.t()
    noise = router.warmup_noise(logits, step=0)

    def selection(routing_logits: torch.Tensor) -> torch.Tensor:
        return torch.topk(torch.softmax(routing_logits.flatten(0, 1), -1), 2).indices

    assert router.warmup_weight(0) == 0.0 and router.warmup_weight(2) == 0.5
    assert router.warmup_weight(4) == 1.0
    # step 0: pure noise; step 2: half and half; after warmup (or in eval): pure signal.
    assert torch.equal(router(x, step=0).expert_ids, selection(noise))
    blended = 0.5 * logits + 0.5 * router.warmup_noise(logits, step=2)
    assert torch.equal(router(x, step=2).expert_ids, selection(blended))
    assert torch.equal(router(x, step=4).expert_ids, selection(logits))
    assert torch.equal(router.eval()(x, step=0).expert_ids, selection(logits))
    # The noise is each token's logit mean plus its logit std times a standard draw
    # shared by every sequence of the batch (same position, same expert)...
    detached = logits.detach()
    mean = detached.mean(-1, keepdim=True)
    standard = (noise - mean) / detached.std(-1, keepdim=True, unbiased=False)
    torch.testing.assert_close(standard[0], standard[1])
    assert not torch.allclose(standard[0, 0], standard[0, 1])
    # ...and is reproducible per (seed, layer, step), different across steps and layers.
    torch.testing.assert_close(router.warmup_noise(logits, step=0), noise)
    assert not torch.equal(router.warmup_noise(logits, step=1), noise)
    assert not torch.equal(_router(warmup_steps=4, layer_id=4).warmup_noise(logits, step=0), noise)


def test_warmup_noise_does_not_depend_on_batch_layout():
    router = _router(warmup_steps=10)
    x = torch.randn(4, 6, 4)
    whole = router(x, step=3).expert_ids
    halves = torch.cat([router(x[:2], step=3).expert_ids, router(x[2:], step=3).expert_ids])
    assert torch.equal(whole, halves)


def test_gate_stays_fp32_under_autocast():
    router = _router()
    with torch.no_grad():
        router.weight.mul_(1 + torch.rand(4, 4))  # values bf16 cannot represent exactly
    x = torch.randn(2, 5, 4)
    with torch.autocast("cpu", torch.bfloat16):
        mixed = router(x, step=0)
    exact = router(x, step=0)
    torch.testing.assert_close(mixed.weights, exact.weights, rtol=0, atol=0)
    torch.testing.assert_close(mixed.z_loss, exact.z_loss, rtol=0, atol=0)


def test_top_1_keeps_the_raw_probability():
    router = _router(top_k=1)
    x = torch.randn(1, 5, 4)
    routing = router(x, step=0)
    probs = torch.softmax(x.flatten(0, 1) @ router.weight.t(), dim=-1)
    torch.testing.assert_close(routing.weights, probs.max(-1, keepdim=True).values)
