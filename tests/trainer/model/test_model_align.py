"""The alignment tool finds an injected deviation at the module where it was injected."""

from __future__ import annotations

import json

import torch

from hetmoe_trainer import align

SEED, BATCH, SEQ = 3, 2, 12


def _stats(tiny, perturb=None):
    model = align.whole_model(tiny, device="cpu", dtype=torch.float32, seed=SEED)
    if perturb is not None:
        perturb(model)
    return align.collect(model, align.fixed_batch(tiny, BATCH, SEQ, SEED))


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.01


def _scale_dense_weight(model):
    with torch.no_grad():
        model.layers["3"].attention.dense.weight.mul_(1.01)


def _scale_shared_expert_gradient(model):
    shared = model.layers["4"].mlp.shared_experts
    original = shared.forward
    shared.forward = lambda x: _ScaleGrad.apply(original(x))


def test_identical_runs_are_aligned(tiny):
    a = _stats(tiny)
    result = align.compare(a, _stats(tiny))
    assert result.first is None and result.largest is not None and result.largest.value == 0.0
    assert not result.only_in_a and not result.only_in_b
    assert [e["module"] for e in a["forward"]][:3] == [
        "embed",
        "layers.0.input_layernorm",
        "layers.0.attention.query_key_value",
    ]
    assert a["forward"][-1]["module"] == "head"
    assert a["backward"][0]["module"] == "head"


def test_forward_deviation_is_located(tiny):
    first = align.compare(_stats(tiny), _stats(tiny, _scale_dense_weight)).first
    assert first is not None
    assert (first.phase, first.module) == ("forward", "layers.3.attention.dense")


def test_backward_only_deviation_is_located(tiny):
    first = align.compare(_stats(tiny), _stats(tiny, _scale_shared_expert_gradient)).first
    assert first is not None
    assert (first.phase, first.module) == ("backward", "layers.4.mlp.shared_experts.down_proj")


def test_cli_run_and_compare(tiny, tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    common = ["--seed", str(SEED), "--batch", str(BATCH), "--seq", str(SEQ)]
    assert align.main(["run", "--preset", "tiny", "--out", str(a), *common]) == 0
    assert align.main(["compare", str(a), str(a)]) == 0
    assert "aligned" in capsys.readouterr().out

    b.write_text(json.dumps({"meta": {}, **_stats(tiny, _scale_dense_weight)}))
    assert align.main(["compare", str(a), str(b)]) == 1
    assert "FIRST DIVERGENCE" in (out := capsys.readouterr().out)
    assert "forward layers.3.attention.dense " in out

    truncated = json.loads(a.read_text())
    truncated["forward"] = truncated["forward"][:-1]
    b.write_text(json.dumps(truncated))
    assert align.main(["compare", str(a), str(b)]) == 0
    assert "1 entries only in run a" in capsys.readouterr().out

    for phase in ("forward", "backward", "param_grads"):
        for entry in truncated[phase]:
            entry["module"] = "renamed." + entry["module"]
    b.write_text(json.dumps(truncated))
    assert align.main(["compare", str(a), str(b)]) == 2
