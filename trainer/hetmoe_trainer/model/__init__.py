"""The Ling (Bailing) MoE model, split into pipeline stages with expert parallelism.

Interface for the runtime::

    ep = ExpertParallel(group, rank_experts, my_index)
    stage = build_stage(arch, stage_plan, training, ep, device=device, dtype=dtype)
    out = stage(inputs, step=global_step)  # hidden [B, S, H] or fp32 logits [B, S, V]

- ``stage.layers``: ModuleDict keyed by global layer id; ``stage.embed`` /
  ``stage.norm`` / ``stage.head`` exist only on the first / last stage;
  ``stage.output``: a :class:`StageOutput` describing the returned tensor.
- ``stage.set_step(step)``: the step used when ``forward`` gets none (pipeline
  schedules pass keyword arguments to the first stage only).
- ``stage.expert_parameters()`` / ``stage.dense_parameters()`` /
  ``stage.named_expert_parameters()`` / ``stage.expert_slices()`` /
  ``stage.expert_param_owner(name)``: gradient sync sets (routed experts are stacked
  per layer; gradient sync works on one slice per expert).
- ``stage.set_aux_loss_scale(scale)``: gradient of the attached balancing losses
  (convention in :mod:`hetmoe_trainer.model.moe`).
- ``stage.pop_expert_load()`` / ``stage.pop_aux_losses()``: per-layer token counts
  and loss values since the last call; ``stage.update_balancing_bias(loads, rate)``:
  aux-loss-free balancing step.

``state_dict()`` names map one-to-one onto the reference Bailing names with
:func:`reference_name` / :func:`local_name` (routed experts appear per expert there,
see :mod:`hetmoe_trainer.model.experts`).
"""

from hetmoe_trainer.model.dispatch import ExpertParallel
from hetmoe_trainer.model.stage import Stage, StageOutput, build_stage, local_name, reference_name

__all__ = ["ExpertParallel", "Stage", "StageOutput", "build_stage", "local_name", "reference_name"]
