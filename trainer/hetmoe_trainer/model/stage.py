"""A pipeline stage of the Ling MoE: optional embedding, a range of layers, optional head.

Layers live in a ModuleDict keyed by their *global* layer id, so a parameter is
called ``layers.17.attention.dense.weight`` whichever stage holds layer 17, and a
checkpoint reshards across different stage splits by name alone. Local names map
one-to-one onto the reference (Hugging Face Bailing) names with
:func:`reference_name`: ``embed`` is ``model.word_embeddings``, ``layers.{i}`` is
``model.layers.{i}``, ``norm`` is ``model.norm`` and ``head`` is ``lm_head``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hetmoe_operator.api.model import ModelArchitecture
from hetmoe_operator.api.training import TrainingConfig
from hetmoe_operator.plan import StagePlan
from hetmoe_trainer.model.block import DecoderLayer
from hetmoe_trainer.model.dispatch import ExpertParallel
from hetmoe_trainer.model.init import initialize
from hetmoe_trainer.model.moe import MoE
from hetmoe_trainer.model.norm import RMSNorm
from hetmoe_trainer.model.rope import rope_tables

_EXPERT_PARAM = re.compile(r"(?:^|\.)mlp\.experts\.(\d+)\.")
_LOCAL_PREFIXES = (
    ("embed.", "model.word_embeddings."),
    ("layers.", "model.layers."),
    ("norm.", "model.norm."),
    ("head.", "lm_head."),
)


def reference_name(local: str) -> str:
    """Reference (Bailing) name of a stage-local parameter or buffer name."""
    for ours, theirs in _LOCAL_PREFIXES:
        if local.startswith(ours):
            return theirs + local[len(ours) :]
    raise KeyError(f"{local!r} is not a stage parameter name")


def local_name(reference: str) -> str:
    """Stage-local name of a reference (Bailing) name; inverse of :func:`reference_name`."""
    for ours, theirs in _LOCAL_PREFIXES:
        if reference.startswith(theirs):
            return ours + reference[len(theirs) :]
    raise KeyError(f"{reference!r} is not a Bailing MoE parameter name")


@dataclass(frozen=True)
class StageOutput:
    """What a stage returns, so the runtime can size pipeline buffers and pick the loss.

    ``kind="hidden"``: ``[B, S, hidden_size]`` in the stage dtype, sent to the next
    stage. ``kind="logits"``: ``[B, S, vocab_size]`` in fp32 (last stage), ready for
    cross-entropy.
    """

    kind: Literal["hidden", "logits"]
    width: int
    dtype: torch.dtype

    def shape(self, batch: int, seq: int) -> tuple[int, int, int]:
        """Output shape for a ``[batch, seq]`` microbatch."""
        return (batch, seq, self.width)


class NormHead(nn.Module):
    """The ``lm_head`` with NormHead as in the Bailing reference.

    The reference divides the weight by its L2 norm over dim 0 (for each hidden
    column, across the vocabulary) with the norm detached from autograd, plus 1e-7.
    We follow the reference code exactly (including the axis) so published weights
    give the published logits; the norm is taken in fp32.
    """

    def __init__(
        self,
        hidden_size: int,
        vocab_size: int,
        *,
        normalize: bool,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.normalize = normalize
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``[B, S, V]``."""
        weight = self.weight
        if self.normalize:
            norm = weight.detach().float().norm(p=2, dim=0, keepdim=True) + 1e-7
            weight = weight / norm.to(weight.dtype)
        return F.linear(x, weight).float()


class _StatsPaused:
    """Recompute re-runs the forward in backward: keep its load and loss stats out.

    A class, not a ``@contextmanager`` generator, because checkpoint enters the same
    recompute context once per backward pass over the layer: twice under the
    zero-bubble V schedule, whose input- and weight-gradient passes each recompute.
    """

    def __init__(self, layer: DecoderLayer) -> None:
        self._mlp = layer.mlp if isinstance(layer.mlp, MoE) else None

    def __enter__(self) -> None:
        if self._mlp is not None:
            self._mlp.record_stats = False

    def __exit__(self, *exc: object) -> None:
        if self._mlp is not None:
            self._mlp.record_stats = True


def _recompute_contexts(
    layer: DecoderLayer,
) -> tuple[AbstractContextManager[None], AbstractContextManager[None]]:
    """Contexts for activation checkpointing: plain forward, stats paused on recompute."""
    return nullcontext(), _StatsPaused(layer)


class Stage(nn.Module):
    """The module one pipeline position runs (see the package docstring for the interface).

    Built from one :class:`StagePlan` or, for an interleaved schedule, from several
    (the position's chunks, e.g. layers 0-2 and 6-8). Every layer still sits in the one
    ``layers`` ModuleDict under its global id, so parameter names, checkpoints, gradient
    sync and the per-layer expert statistics do not depend on the chunking;
    ``forward(x, chunk=k)`` runs chunk ``k`` alone (what a virtual pipeline stage calls).
    """

    def __init__(
        self,
        arch: ModelArchitecture,
        plan: StagePlan | Sequence[StagePlan],
        training: TrainingConfig,
        ep: ExpertParallel,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.chunks: tuple[StagePlan, ...] = (plan,) if isinstance(plan, StagePlan) else tuple(plan)
        if not self.chunks:
            raise ValueError("a stage needs at least one StagePlan")
        self.balancing = training.balancing
        self.step = 0
        """Global step used when ``forward`` gets none (non-first pipeline stages)."""
        self.has_embedding = self.chunks[0].has_embedding
        self.has_head = self.chunks[-1].has_head
        if self.has_embedding:
            self.embed = nn.Embedding(arch.vocab_size, arch.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleDict(
            {
                str(i): DecoderLayer(arch, training, ep, i, device=device, dtype=dtype)
                for chunk in self.chunks
                for i in chunk.layers
            }
        )
        if self.has_head:
            self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, device=device, dtype=dtype)
            self.head = NormHead(
                arch.hidden_size,
                arch.vocab_size,
                normalize=arch.norm_head,
                device=device,
                dtype=dtype,
            )
        self.output = (
            StageOutput("logits", arch.vocab_size, torch.float32)
            if self.has_head
            else StageOutput("hidden", arch.hidden_size, dtype)
        )

    def chunk_output(self, chunk: int) -> StageOutput:
        """What chunk ``chunk`` returns (hidden states unless it is the head's chunk)."""
        if chunk == len(self.chunks) - 1:
            return self.output
        return StageOutput("hidden", self.arch.hidden_size, next(self.parameters()).dtype)

    def set_step(self, step: int) -> None:
        """Global step for forwards called without ``step`` (routing warmup needs it).

        torch.distributed.pipelining hands keyword arguments to the first stage only,
        so the runtime sets the step on every stage before each schedule step.
        """
        self.step = step

    def forward(
        self, inputs: torch.Tensor, step: int | None = None, chunk: int | None = None
    ) -> torch.Tensor:
        """Token ids ``[B, S]`` (first chunk) or hidden ``[B, S, H]`` -> hidden or logits.

        ``chunk=None`` runs every chunk in order, which is the model only when the
        chunks are consecutive (one pipeline position); a pipeline runs one at a time.
        """
        step = self.step if step is None else step
        chunks = range(len(self.chunks)) if chunk is None else (chunk,)
        x = inputs
        for k in chunks:
            x = self._run_chunk(self.chunks[k], x, step)
        return x

    def _run_chunk(self, plan: StagePlan, x: torch.Tensor, step: int) -> torch.Tensor:
        if plan.has_embedding:
            x = self.embed(x)
        if plan.layers:
            cos, sin = rope_tables(
                x.shape[1],
                self.arch.resolved_head_dim,
                self.arch.rope_theta,
                device=x.device,
                dtype=x.dtype,
            )
            recompute = plan.recompute_activations and torch.is_grad_enabled()
            for i in plan.layers:
                layer = self.layers[str(i)]
                if recompute:
                    x = checkpoint(
                        layer,
                        x,
                        cos,
                        sin,
                        step,
                        use_reentrant=False,
                        context_fn=partial(_recompute_contexts, layer),
                    )
                else:
                    x = layer(x, cos, sin, step)
        if plan.has_head:
            return self.head(self.norm(x))
        return x

    def compile_regions(self, backend: str = "inductor") -> None:
        """Regional ``torch.compile`` of every layer (see :meth:`DecoderLayer.compile_regions`)."""
        for layer in self.layers.values():
            assert isinstance(layer, DecoderLayer)
            layer.compile_regions(backend)

    def moe_layers(self) -> dict[int, MoE]:
        """MoE blocks of this stage by global layer id."""
        return {int(i): layer.mlp for i, layer in self.layers.items() if isinstance(layer.mlp, MoE)}

    @staticmethod
    def expert_param_owner(name: str) -> int | None:
        """Global expert id of a per-expert name (``...mlp.experts.{e}.up_proj.weight``, as
        ``state_dict()`` and checkpoints spell routed-expert tensors), None for any other."""
        match = _EXPERT_PARAM.search(name)
        return int(match.group(1)) if match else None

    def named_expert_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The stacked routed-expert parameters (``layers.{i}.mlp.experts.gate_up_proj`` ...)."""
        for i, moe in self.moe_layers().items():
            yield from moe.experts.named_parameters(prefix=f"layers.{i}.mlp.experts")

    def expert_parameters(self) -> Iterator[nn.Parameter]:
        """Routed-expert parameters: each expert's slice is synced only among its hosts."""
        for _, param in self.named_expert_parameters():
            yield param

    def dense_parameters(self) -> Iterator[nn.Parameter]:
        """Every other parameter: synced across all data-parallel replicas of the stage."""
        expert = {id(p) for p in self.expert_parameters()}
        for param in self.parameters():
            if id(param) not in expert:
                yield param

    def expert_slices(self) -> Iterator[tuple[int, str, nn.Parameter, int]]:
        """Per hosted expert and stacked parameter: ``(global expert id, name, parameter,
        index in dim 0)``, named ``layers.{i}.mlp.experts.{e}.<stack>`` (global ids, so
        every host of an expert names its slices alike)."""
        for i, moe in self.moe_layers().items():
            for expert, stacked, param, index in moe.experts.expert_slices():
                yield expert, f"layers.{i}.mlp.experts.{expert}.{stacked}", param, index

    def set_aux_loss_scale(self, scale: float) -> None:
        """Gradient scale of every attached aux + z loss (convention in ``moe.py``)."""
        for moe in self.moe_layers().values():
            moe.set_aux_loss_scale(scale)

    def pop_expert_load(self) -> dict[int, torch.Tensor]:
        """Per global layer id: int64 token slots per global expert since the last call.

        Counts cover this rank's tokens only; sum them over the data-parallel group
        for a global view (and before :meth:`update_balancing_bias`).
        """
        return {i: moe.pop_expert_load() for i, moe in self.moe_layers().items()}

    def pop_aux_losses(self) -> dict[int, dict[str, float]]:
        """Per global layer id: mean ``aux_loss`` and ``z_loss`` per forward since the last call."""
        return {i: moe.pop_aux_losses() for i, moe in self.moe_layers().items()}

    def update_balancing_bias(self, loads: dict[int, torch.Tensor], rate: float = 1e-3) -> None:
        """Aux-loss-free balancing: ``bias += rate * sign(mean load - load)`` per layer.

        ``loads`` (as from :meth:`pop_expert_load`, summed over the data-parallel group)
        must be identical on every rank so every replica keeps the same bias. Call it
        once per optimizer step, after the optimizer update.
        """
        if self.balancing != "bias":
            raise RuntimeError("update_balancing_bias needs training.balancing == 'bias'")
        moes = self.moe_layers()
        for layer, load in loads.items():
            moes[layer].gate.update_bias(load, rate)


def build_stage(
    arch: ModelArchitecture,
    stage: StagePlan | Sequence[StagePlan],
    training: TrainingConfig,
    ep: ExpertParallel,
    *,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> Stage:
    """Build and deterministically initialise one pipeline stage (or its chunks) on ``device``.

    PyTorch's default initialisation runs first and is then overwritten by
    :func:`~hetmoe_trainer.model.init.initialize` from (seed, reference name).
    (Building on the meta device would skip that, but its first ``to_empty`` costs
    seconds per process, which every multi-process test and elastic restart pays.)
    """
    module = Stage(arch, stage, training, ep, device=device, dtype=dtype)
    initialize(module, arch, training.seed, reference_name)
    return module
