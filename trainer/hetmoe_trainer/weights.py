"""Hugging Face-style safetensors checkpoints with the reference Bailing MoE names.

A directory written here looks like a published Ling checkpoint: ``config.json``
(Bailing field names), ``model.safetensors`` or ``model-0000i-of-0000N.safetensors``
shards plus ``model.safetensors.index.json``, tensors named
``model.word_embeddings.weight``, ``model.layers.{i}.attention.query_key_value.weight``,
``model.layers.{i}.mlp.experts.{e}.up_proj.weight``, ``lm_head.weight`` ... so a user
holding published weights can start from them, and our checkpoints load in the
reference ``BailingMoeForCausalLM``.

A stage reads only the tensors it holds (its layers, its experts) through lazy
``safe_open`` reads. Distributed writers each save the tensors they own with
:func:`save_stage` into their own file, then one rank merges the returned weight
maps with :func:`write_index`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from hetmoe_operator.api.model import ModelArchitecture
from hetmoe_trainer.model.stage import Stage, local_name, reference_name

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3

_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
}

_OPTIONAL = ("mlp.gate.expert_bias",)
"""Our additions absent from published Ling weights; missing ones keep their initial value."""


def reference_state(
    module: nn.Module, *, skip_experts: Collection[int] = (), include_dense: bool = True
) -> dict[str, torch.Tensor]:
    """Reference-named CPU copies of a stage's parameters and persistent buffers.

    ``skip_experts``: routed experts another rank writes (replicas are saved once);
    ``include_dense=False``: leave out everything but routed experts (another
    data-parallel replica writes them).
    """
    state: dict[str, torch.Tensor] = {}
    for name, tensor in module.state_dict().items():
        owner = Stage.expert_param_owner(name)
        if (owner is None and not include_dense) or (owner is not None and owner in skip_experts):
            continue
        cpu = tensor.detach().to("cpu").contiguous()
        # Routed experts are views into per-layer stacks; safetensors refuses tensors
        # sharing storage, so each expert's tensor gets its own.
        state[reference_name(name)] = cpu.clone() if owner is not None else cpu
    return state


def save_stage(
    stage: nn.Module,
    directory: str | Path,
    filename: str,
    *,
    skip_experts: Collection[int] = (),
    include_dense: bool = True,
) -> dict[str, str]:
    """Write this stage's tensors to ``directory/filename``; returns its weight map.

    Options as in :func:`reference_state`, so every tensor is written exactly once.
    """
    state = reference_state(stage, skip_experts=skip_experts, include_dense=include_dense)
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / filename), metadata={"format": "pt"})
    return dict.fromkeys(state, filename)


def write_index(directory: str | Path, weight_map: Mapping[str, str]) -> None:
    """Write ``model.safetensors.index.json`` for shards already in ``directory``."""
    path = Path(directory)
    total = 0
    by_file: dict[str, list[str]] = {}
    for name, filename in weight_map.items():
        by_file.setdefault(filename, []).append(name)
    for filename, names in by_file.items():
        with safe_open(str(path / filename), framework="pt") as f:
            for name in names:
                tensor_slice = f.get_slice(name)
                itemsize = _ITEMSIZE[tensor_slice.get_dtype()]
                total += math.prod(tensor_slice.get_shape()) * itemsize
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def save_pretrained(
    stages: Iterable[nn.Module],
    directory: str | Path,
    arch: ModelArchitecture,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> None:
    """Single-process save of whole-model stages as a Hugging Face checkpoint.

    One ``model.safetensors`` when everything fits in ``max_shard_bytes``, else
    ``model-0000i-of-0000N.safetensors`` shards with an index, plus ``config.json``.
    """
    state: dict[str, torch.Tensor] = {}
    for stage in stages:
        state.update(reference_state(stage))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(bailing_config(arch), indent=2) + "\n")
    if len(shards) == 1:
        save_file(shards[0], str(path / SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    write_index(path, weight_map)


def weight_map(directory: str | Path) -> dict[str, str]:
    """Reference name -> file, from the index or the single ``model.safetensors``."""
    path = Path(directory)
    if (path / INDEX_FILE).exists():
        return dict(json.loads((path / INDEX_FILE).read_text())["weight_map"])
    with safe_open(str(path / SINGLE_FILE), framework="pt") as f:
        return dict.fromkeys(f.keys(), SINGLE_FILE)


@torch.no_grad()
def load_stage(stage: nn.Module, directory: str | Path) -> list[str]:
    """Copy this stage's tensors (and only those) from a checkpoint; returns names loaded.

    Tensors are cast to the stage's dtype and device. Every parameter must be in the
    checkpoint; our optional additions (the balancing bias) may be absent.
    """
    path = Path(directory)
    files = weight_map(path)
    wanted = {reference_name(name): tensor for name, tensor in stage.state_dict().items()}
    missing = [n for n in wanted if n not in files and not n.endswith(_OPTIONAL)]
    if missing:
        raise KeyError(f"checkpoint {path} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    by_file: dict[str, list[str]] = {}
    for name in wanted:
        if name in files:
            by_file.setdefault(files[name], []).append(name)
    for filename, names in sorted(by_file.items()):
        with safe_open(str(path / filename), framework="pt") as f:
            for name in names:
                source = f.get_tensor(name)
                target = wanted[name]
                if source.shape != target.shape:
                    raise ValueError(
                        f"{name}: checkpoint shape {tuple(source.shape)} != {tuple(target.shape)}"
                    )
                target.copy_(source.to(device=target.device, dtype=target.dtype))
    return sorted(n for names in by_file.values() for n in names)


def bailing_config(arch: ModelArchitecture) -> dict[str, object]:
    """A Bailing MoE ``config.json`` for ``arch`` (loadable by the reference model code)."""
    return {
        "architectures": ["BailingMoeForCausalLM"],
        "model_type": "bailing_moe",
        "auto_map": {
            "AutoConfig": "configuration_bailing_moe.BailingMoeConfig",
            "AutoModelForCausalLM": "modeling_bailing_moe.BailingMoeForCausalLM",
        },
        **arch.model_dump(mode="json"),
        "head_dim": arch.resolved_head_dim,
        "hidden_act": "silu",
        "norm_topk_prob": True,
        "use_bias": False,
        "use_qkv_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def architecture_from_config(config: str | Path | Mapping[str, object]) -> ModelArchitecture:
    """The architecture of a Bailing ``config.json`` (path, directory or parsed dict).

    Only the fields :class:`ModelArchitecture` knows are read; the rest (``torch_dtype``,
    ``auto_map``, rope scaling that we do not implement...) is ignored.
    """
    if isinstance(config, Mapping):
        fields = dict(config)
    else:
        path = Path(config)
        fields = json.loads((path / CONFIG_FILE if path.is_dir() else path).read_text())
    known = set(ModelArchitecture.model_fields)
    return ModelArchitecture.model_validate({k: v for k, v in fields.items() if k in known})


__all__ = [
    "architecture_from_config",
    "bailing_config",
    "load_stage",
    "local_name",
    "reference_state",
    "save_pretrained",
    "save_stage",
    "weight_map",
    "write_index",
]
