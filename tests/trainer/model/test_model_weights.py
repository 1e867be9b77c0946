"""Safetensors checkpoints with the reference Bailing names: round trip, sharding, naming."""

from __future__ import annotations

import json

import pytest
import torch

from hetmoe_operator.api.model import ModelArchitecture
from hetmoe_trainer.model import local_name, reference_name
from hetmoe_trainer.weights import (
    INDEX_FILE,
    architecture_from_config,
    load_stage,
    reference_state,
    save_pretrained,
    save_stage,
    weight_map,
    write_index,
)


def expected_bailing_names(arch: ModelArchitecture) -> set[str]:
    """Tensor names of BailingMoeForCausalLM (inclusionAI/Ling modeling_bailing_moe.py)."""
    names = {"model.word_embeddings.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(arch.num_hidden_layers):
        p = f"model.layers.{i}."
        names |= {
            p + "input_layernorm.weight",
            p + "post_attention_layernorm.weight",
            p + "attention.query_key_value.weight",
            p + "attention.dense.weight",
        }
        if i < arch.first_k_dense_replace:
            names |= {p + f"mlp.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")}
            continue
        names.add(p + "mlp.gate.weight")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names.add(p + f"mlp.shared_experts.{proj}.weight")
            names |= {p + f"mlp.experts.{e}.{proj}.weight" for e in range(arch.num_experts)}
    return names


def test_names_match_the_reference_scheme(make_stage, tiny):
    state = reference_state(make_stage())
    assert set(state) == expected_bailing_names(tiny)
    heads, kv, dim = tiny.num_attention_heads, tiny.num_key_value_heads, tiny.resolved_head_dim
    assert state["model.layers.0.attention.query_key_value.weight"].shape == (
        (heads + 2 * kv) * dim,
        tiny.hidden_size,
    )
    shared = tiny.moe_intermediate_size * tiny.num_shared_experts
    assert state["model.layers.1.mlp.shared_experts.up_proj.weight"].shape == (
        shared,
        tiny.hidden_size,
    )
    assert state["model.layers.1.mlp.gate.weight"].shape == (tiny.num_experts, tiny.hidden_size)
    assert state["lm_head.weight"].shape == (tiny.vocab_size, tiny.hidden_size)
    for name in state:
        assert reference_name(local_name(name)) == name
    with pytest.raises(KeyError):
        local_name("transformer.h.0.attn.weight")


def test_round_trip_single_file(make_stage, training, tmp_path, tiny):
    source = make_stage()
    save_pretrained([source], tmp_path, tiny)
    assert (tmp_path / "model.safetensors").exists()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_experts_per_tok"] == tiny.num_experts_per_tok
    assert config["architectures"] == ["BailingMoeForCausalLM"]
    # head_dim is written resolved, as published configs carry it.
    assert architecture_from_config(tmp_path) == tiny.model_copy(
        update={"head_dim": tiny.resolved_head_dim}
    )

    target = make_stage(config=training.model_copy(update={"seed": training.seed + 1}))
    assert not torch.equal(
        target.layers["3"].attention.dense.weight, source.layers["3"].attention.dense.weight
    )
    loaded = load_stage(target, tmp_path)
    assert set(loaded) == expected_bailing_names(tiny)
    for (name, a), (_, b) in zip(
        source.state_dict().items(), target.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_sharded_checkpoint_loads_into_other_stage_splits(make_stage, training, tmp_path, tiny):
    source = make_stage()
    save_pretrained([source], tmp_path, tiny, max_shard_bytes=200_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((tmp_path / f).exists() for f in files)
    assert index["metadata"]["total_size"] == 4 * tiny.total_params

    other = training.model_copy(update={"seed": training.seed + 1})
    reference = source.state_dict()
    for stage in (make_stage(0, 3, config=other), make_stage(3, 6, [5, 6], config=other)):
        loaded = load_stage(stage, tmp_path)
        assert len(loaded) == len(stage.state_dict())
        for name, value in stage.state_dict().items():
            torch.testing.assert_close(value, reference[name], rtol=0, atol=0, msg=name)


def test_per_rank_shards_with_replicas_saved_once(make_stage, tmp_path, tiny):
    first, second = make_stage(0, 6, [0, 1, 2, 3, 4]), make_stage(0, 6, [4, 5, 6, 7])
    mapping = save_stage(first, tmp_path, "model-ep0.safetensors")
    second_map = save_stage(
        second, tmp_path, "model-ep1.safetensors", skip_experts=[4], include_dense=False
    )
    assert not set(mapping) & set(second_map)
    write_index(tmp_path, mapping | second_map)
    files = weight_map(tmp_path)
    assert set(files) == expected_bailing_names(tiny)
    assert files["model.layers.2.mlp.experts.4.up_proj.weight"] == "model-ep0.safetensors"
    assert files["model.layers.2.mlp.experts.5.up_proj.weight"] == "model-ep1.safetensors"
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == 4 * tiny.total_params
    load_stage(make_stage(), tmp_path)


def test_missing_tensor_and_wrong_shape_are_errors(make_stage, tmp_path, tiny):
    save_stage(make_stage(0, 3), tmp_path, "model.safetensors")
    with pytest.raises(KeyError, match="lacks"):
        load_stage(make_stage(), tmp_path)
    wide = tiny.model_copy(update={"vocab_size": tiny.vocab_size * 2})
    with pytest.raises(ValueError, match="shape"):
        load_stage(make_stage(0, 3, arch=wide), tmp_path)


def test_bfloat16_checkpoint_loads_into_fp32(make_stage, tmp_path, tiny):
    source = make_stage(dtype=torch.bfloat16)
    save_pretrained([source], tmp_path, tiny)
    target = make_stage()
    load_stage(target, tmp_path)
    torch.testing.assert_close(
        target.layers["2"].attention.dense.weight,
        source.layers["2"].attention.dense.weight.float(),
        rtol=0,
        atol=0,
    )


def test_architecture_from_a_published_style_config():
    published = {
        "architectures": ["BailingMoeForCausalLM"],
        "model_type": "bailing_moe",
        "hidden_size": 2048,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": 64,
        "num_shared_experts": 2,
        "num_experts_per_tok": 6,
        "moe_intermediate_size": 1408,
        "intermediate_size": 5632,
        "first_k_dense_replace": 0,
        "vocab_size": 126464,
        "max_position_embeddings": 16384,
        "rope_theta": 600000,
        "rms_norm_eps": 1e-6,
        "norm_head": True,
        "norm_topk_prob": True,
        "torch_dtype": "bfloat16",
    }
    arch = architecture_from_config(published)
    assert arch.num_experts_per_tok == 6 and arch.resolved_head_dim == 128
    assert abs(arch.total_params - 16.8e9) / 16.8e9 < 0.02
