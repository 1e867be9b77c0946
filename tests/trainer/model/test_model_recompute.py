"""Activation recompute (the planner's ``recompute_activations``) changes memory, not maths."""

from __future__ import annotations

import torch

from hetmoe_operator.plan import StagePlan
from hetmoe_trainer.model import ExpertParallel, build_stage


def _loss_grads_and_load(tiny, training, recompute: bool):
    plan = StagePlan.whole_model(tiny, recompute=recompute)
    ep = ExpertParallel(None, [list(range(tiny.num_experts))], 0)
    stage = build_stage(tiny, plan, training, ep, device="cpu")
    stage.train()
    tokens = torch.randint(0, tiny.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = stage(tokens, step=3)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    loss.backward()
    grads = {name: p.grad.clone() for name, p in stage.named_parameters() if p.grad is not None}
    return loss.detach(), grads, stage.pop_expert_load()


def test_recompute_gives_the_same_loss_gradients_and_expert_counts(tiny, training):
    loss, grads, load = _loss_grads_and_load(tiny, training, recompute=False)
    loss_rc, grads_rc, load_rc = _loss_grads_and_load(tiny, training, recompute=True)
    assert torch.equal(loss, loss_rc)
    assert grads.keys() == grads_rc.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_rc[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    # Recompute re-runs each block's forward in backward; loads must not be counted twice.
    assert load.keys() == load_rc.keys()
    for layer, counts in load.items():
        assert torch.equal(load_rc[layer], counts), layer
