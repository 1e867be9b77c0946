"""SwiGLU feed-forward networks: the dense FFN, shared experts and routed experts.

A MoE layer's routed experts live in one :class:`RoutedExperts` module as two
stacked parameters, ``gate_up_proj`` ``[E_local, 2I, H]`` (each expert's gate rows
then its up rows) and ``down_proj`` ``[E_local, H, I]``, in ascending global expert
id. That is the layout the grouped matmul consumes, so a forward copies no weights
(stacking 16 per-expert tensors per layer on every forward cost three 4 MiB copies
per layer and three more in backward), and the optimizer updates two tensors per
layer instead of three per expert.

Everything that needs one expert at a time sees per-expert views of the stacks:

- ``state_dict()`` (and therefore initialisation, DCP checkpoints and the reference
  safetensors names) yields ``{e}.gate_proj.weight`` / ``{e}.up_proj.weight`` /
  ``{e}.down_proj.weight`` keyed by *global* expert id, as views into the stacks,
  so loading fills the stacks in place and a checkpoint reshards across expert
  placements by name; ``load_state_dict`` accepts those keys too;
- :func:`per_expert_tensors` splits any tensor shaped like a stacked parameter
  (its gradient, AdamW moments) the same way;
- :meth:`RoutedExperts.expert_slices` gives gradient sync one slice per expert, so
  each expert's gradient is still summed only over the ranks hosting that expert;
- each hosted expert is also a parameterless child module ``{e}`` that the
  per-expert loop calls, so per-module hooks (the align tool) still see
  ``mlp.experts.{e}``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

STACKED = ("gate_up_proj", "down_proj")
"""Names of the stacked routed-expert parameters."""


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` without biases (BailingMoeMLP)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(
            hidden_size, intermediate_size, bias=False, device=device, dtype=dtype
        )
        self.up_proj = nn.Linear(
            hidden_size, intermediate_size, bias=False, device=device, dtype=dtype
        )
        self.down_proj = nn.Linear(
            intermediate_size, hidden_size, bias=False, device=device, dtype=dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the FFN to the last dimension of ``x``."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, dims: tuple[int, ...]) -> bool:
    """Whether ``torch._grouped_mm`` can run these expert shapes here.

    CUDA: bf16 on compute capability >= 9.0. CPU: the kernel exists from torch 2.9.
    Both need every inner dimension 16-byte aligned.
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    itemsize = torch.empty((), dtype=dtype).element_size()
    if any(d * itemsize % 16 for d in dims):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)
    return device.type == "cpu"


class _DenseGrad(torch.autograd.Function):
    """Identity that makes the incoming gradient dense.

    ``_grouped_mm``'s backward rejects stride-0 gradients (what ``sum()`` or
    ``expand`` produce), so its output passes through here.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def compute_dtype(tokens: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in here: the autocast dtype when autocast is on."""
    device = tokens.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return tokens.dtype


def _swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


class ExpertSlot(nn.Module):
    """One hosted routed expert as a module of its own (no parameters of its own).

    The per-expert loop calls it with that expert's views of the stacked weights, so
    forward hooks see ``mlp.experts.{e}`` exactly where the expert runs.
    """

    def forward(self, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """``down(silu(gate x) * (up x))`` with ``gate_up`` = ``[gate; up]`` rows."""
        return _swiglu(x, gate_up, down)


class RoutedExperts(nn.Module):
    """The routed experts one rank hosts in one MoE layer, stored stacked (module docstring)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        expert_ids: Sequence[int],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        ids = tuple(expert_ids)
        if list(ids) != sorted(set(ids)):
            raise ValueError(f"expert ids must be ascending and distinct, got {list(ids)}")
        self.expert_ids = ids
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(
            torch.empty(len(ids), 2 * intermediate_size, hidden_size, device=device, dtype=dtype)
        )
        self.down_proj = nn.Parameter(
            torch.empty(len(ids), hidden_size, intermediate_size, device=device, dtype=dtype)
        )
        for e in ids:
            self.add_module(str(e), ExpertSlot())
        self.register_state_dict_post_hook(_unstack_state)
        self.register_load_state_dict_pre_hook(_stack_state)

    def expert_views(self, stacked: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """``({e}.<proj>.weight, view)`` per hosted expert of a tensor shaped like ``stacked``.

        A 0-dim tensor (AdamW's per-parameter ``step``) is shared by all its experts.
        """
        if stacked not in STACKED:
            raise KeyError(f"{stacked!r} is not a stacked expert parameter")
        inter = self.intermediate_size
        views: list[tuple[str, torch.Tensor]] = []
        for i, e in enumerate(self.expert_ids):
            if stacked == "gate_up_proj":
                gate = tensor if tensor.ndim == 0 else tensor[i, :inter]
                up = tensor if tensor.ndim == 0 else tensor[i, inter:]
                views += [(f"{e}.gate_proj.weight", gate), (f"{e}.up_proj.weight", up)]
            else:
                views.append((f"{e}.down_proj.weight", tensor if tensor.ndim == 0 else tensor[i]))
        return views

    def expert_slices(self) -> Iterator[tuple[int, str, nn.Parameter, int]]:
        """``(global expert id, stacked name, parameter, index in dim 0)`` per expert and stack."""
        for name in STACKED:
            param = getattr(self, name)
            for i, e in enumerate(self.expert_ids):
                yield e, name, param, i

    def forward(
        self, tokens: torch.Tensor, counts: list[int], *, grouped: bool | None = None
    ) -> torch.Tensor:
        """Apply the i-th hosted expert to the ``counts[i]`` consecutive rows of ``tokens``.

        ``grouped=None`` (the default) and ``grouped=True`` use the grouped matmul where
        :func:`grouped_mm_supported` (on CPU it is about as fast as the loop, faster with
        many small experts), else the per-expert loop; ``grouped=False`` forces the
        loop. Under autocast the grouped path runs in the autocast dtype, as the loop's
        linears do. Both give the same result up to matmul rounding, and both give
        every hosted expert a gradient (zero when it got no rows).
        """
        if not self.expert_ids:
            return tokens.new_zeros(tokens.shape)
        dtype = compute_dtype(tokens)
        dims = (tokens.shape[-1], self.intermediate_size)
        supported = grouped_mm_supported(tokens.device, dtype, dims)
        if grouped is None:
            grouped = supported
        if grouped and supported and tokens.shape[0] > 0:
            return self._grouped(tokens, counts, dtype)
        return self._loop(tokens, counts)

    def _grouped(self, tokens: torch.Tensor, counts: list[int], dtype: torch.dtype) -> torch.Tensor:
        offsets = torch.tensor(counts, device=tokens.device).cumsum(0).to(torch.int32)
        # [G, out, in] viewed as [G, in, out]: the column-major right-hand operand
        # layout the CUDA kernel is tuned for (as in torchtitan); no copy in fp32.
        w_gate_up = self.gate_up_proj.to(dtype).transpose(-2, -1)
        w_down = self.down_proj.to(dtype).transpose(-2, -1)
        x = tokens.to(dtype)
        gate, up = _DenseGrad.apply(torch._grouped_mm(x, w_gate_up, offs=offsets)).chunk(2, -1)
        out = torch._grouped_mm(F.silu(gate) * up, w_down, offs=offsets)
        return _DenseGrad.apply(out)

    def _loop(self, tokens: torch.Tensor, counts: list[int]) -> torch.Tensor:
        # unbind (not indexing per expert): its backward stacks the experts' gradients
        # in one copy, and empty slices still give their expert a zero gradient.
        chunks = torch.split(tokens, counts)
        gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        return torch.cat(
            [
                self.get_submodule(str(e))(chunk, gate_up[i], down[i])
                for i, (e, chunk) in enumerate(zip(self.expert_ids, chunks, strict=True))
            ]
        )


def _unstack_state(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, _metadata: object
) -> None:
    """state_dict post-hook: per-expert views under the reference names instead of the stacks."""
    assert isinstance(module, RoutedExperts)
    for name in STACKED:
        stacked = state_dict.pop(prefix + name)
        for suffix, view in module.expert_views(name, stacked):
            state_dict[prefix + suffix] = view


def _stack_state(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    _metadata: object,
    _strict: bool,
    missing_keys: list[str],
    *_args: object,
) -> None:
    """load_state_dict pre-hook: gather per-expert tensors back into the stacks' keys."""
    assert isinstance(module, RoutedExperts)
    for name in STACKED:
        param = getattr(module, name)
        if prefix + name in state_dict:
            continue  # already stacked
        stacked = param.detach().clone()
        absent = []
        for suffix, view in module.expert_views(name, stacked):
            if prefix + suffix in state_dict:
                view.copy_(state_dict.pop(prefix + suffix))
            else:
                absent.append(prefix + suffix)
        if len(absent) < len(module.expert_ids) * (2 if name == "gate_up_proj" else 1):
            # Some experts given: load them, report the others by their own names.
            state_dict[prefix + name] = stacked
            missing_keys.extend(absent)
        # None given: load_state_dict reports the stacked key as missing itself.


def per_expert_tensors(
    module: nn.Module, name: str, tensor: torch.Tensor
) -> list[tuple[str, torch.Tensor]]:
    """``[(name, tensor)]``, or per-expert names and views when ``name`` is a stacked parameter.

    ``name`` is a parameter name of ``module``; ``tensor`` is shaped like it (the
    parameter itself, its gradient, an optimizer moment, or a 0-dim step).
    """
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if isinstance(owner, RoutedExperts):
        return [
            (f"{owner_name}.{suffix}", view) for suffix, view in owner.expert_views(leaf, tensor)
        ]
    return [(name, tensor)]
