"""Deterministic, layout-independent initialisation.

Every tensor is drawn from its own CPU generator seeded by a hash of the run seed
and the tensor's *reference name* (``model.layers.{i}.mlp.experts.{e}.up_proj.weight``),
which already encodes the global layer id and global expert id. Which rank or
stage builds a tensor, how many experts it hosts and which device it lives on
therefore never change its values: a 4-process pp/ep/dp run starts from exactly
the weights of a single-process run, and a CUDA run from those of a CPU run.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch
from torch import nn

from hetmoe_operator.api.model import ModelArchitecture


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts; stable across processes and Python runs."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def cpu_generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded from :func:`derive_seed` of ``parts``."""
    return torch.Generator(device="cpu").manual_seed(derive_seed(*parts))


def _initial_value(
    arch: ModelArchitecture, reference_name: str, shape: torch.Size, gen: torch.Generator
) -> torch.Tensor:
    """The reference initialisation of one tensor in fp32 on CPU.

    Mirrors the Bailing reference: norms are ones, the router gate keeps PyTorch's
    default Kaiming-uniform bound 1/sqrt(hidden), every other weight is
    N(0, initializer_range). The balancing bias (a buffer) starts at zero.
    """
    if reference_name.endswith("layernorm.weight") or reference_name == "model.norm.weight":
        return torch.ones(shape)
    if reference_name.endswith("mlp.gate.weight"):
        bound = 1.0 / math.sqrt(shape[-1])
        return torch.empty(shape).uniform_(-bound, bound, generator=gen)
    if reference_name.endswith("mlp.gate.expert_bias"):
        return torch.zeros(shape)
    return torch.empty(shape).normal_(0.0, arch.initializer_range, generator=gen)


@torch.no_grad()
def initialize(
    module: nn.Module,
    arch: ModelArchitecture,
    seed: int,
    reference_name: Callable[[str], str],
) -> None:
    """Initialise every parameter and persistent buffer of ``module`` in place.

    ``reference_name`` maps a local name (``layers.3.attention.dense.weight``) to its
    reference name; values are generated in fp32 on CPU from (seed, reference name)
    and then copied to the tensor's device and dtype, so every device kind starts
    identical. Works on modules materialised with ``to_empty`` from the meta device.
    """
    for name, tensor in module.state_dict(keep_vars=True).items():
        ref = reference_name(name)
        value = _initial_value(arch, ref, tensor.shape, cpu_generator(seed, "init", ref))
        tensor.data.copy_(value.to(device=tensor.device, dtype=tensor.dtype))
