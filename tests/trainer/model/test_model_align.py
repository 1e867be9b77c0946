"""The alignment tool finds an injected deviation at the module where it was injected."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch

from hetmoe_trainer import align

SEED, BATCH, SEQ = 3, 2, 12
PERTURBED = "layers.4.attention.dense.weight=1.01"


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
    # The shared expert runs in two halves (overlapping the two exchanges); the second
    # half's backward runs first, while the combine's transpose is in flight.
    assert (first.phase, first.module) == (
        "backward",
        "layers.4.mlp.shared_experts.down_proj#2",
    )


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


def _torchrun_align(tmp_path, out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    common = ["--seed", str(SEED), "--batch", str(BATCH), "--seq", str(SEQ)]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            "--nproc-per-node=2",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            "-m",
            "hetmoe_trainer",
            "align",
            "run",
            "--out",
            str(out),
            *common,
            *extra,
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_parallel_layouts_align_with_one_process(tiny, tmp_path):
    """ep=2 and pp=2 under torchrun match one process; a perturbation is located."""
    single = tmp_path / "single.json"
    common = ["--seed", str(SEED), "--batch", str(BATCH), "--seq", str(SEQ)]
    assert align.main(["run", "--out", str(single), "--grouped-mm", "off", *common]) == 0
    reference = json.loads(single.read_text())

    ep2 = _torchrun_align(tmp_path, tmp_path / "ep2.json", "--ep", "2", "--grouped-mm", "off")
    result = align.compare(reference, ep2, rtol=1e-6)
    assert result.first is None, result.first
    # Per-expert modules run only in the loop fallback; with experts split over two
    # members they must still be found (on their host) and match.
    assert any(".mlp.experts.5" in e["module"] for e in ep2["forward"])
    assert not result.only_in_a and not result.only_in_b

    perturbed = _torchrun_align(
        tmp_path, tmp_path / "pp2.json", "--pp", "2", "--grouped-mm", "off", "--perturb", PERTURBED
    )
    first = align.compare(reference, perturbed).first
    assert first is not None
    # Layer 4 lives on stage 1: everything stage 0 computed, and layer 4 up to the
    # perturbed projection, came through the pipeline aligned.
    assert (first.phase, first.module) == ("forward", "layers.4.attention.dense")


def test_bad_align_input_is_one_message(tmp_path, capsys):
    out = str(tmp_path / "x.json")
    assert align.main(["run", "--pp", "2", "--out", out]) == 2
    assert "torchrun --nproc-per-node=2" in capsys.readouterr().err
    assert align.main(["run", "--perturb", "nonsense", "--out", out]) == 2
    assert "PARAMETER=FACTOR" in capsys.readouterr().err
    assert align.main(["run", "--perturb", "no.such=2", "--out", out]) == 2
    assert "no parameter is called 'no.such'" in capsys.readouterr().err
    assert align.main(["compare", out, out]) == 2
    assert "cannot read the runs" in capsys.readouterr().err
