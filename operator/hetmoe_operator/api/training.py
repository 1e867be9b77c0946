"""What to train and how: budget, batch, schedule, data, stability knobs.

These settings travel unchanged from the MoEJob spec through the plan to the trainer.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from hetmoe_operator.api.base import ApiModel


class LearningRateSchedule(ApiModel):
    """Warmup, then constant, cosine or warmup-stable-decay (WSD) decay."""

    peak: float = Field(default=3e-4, gt=0, le=1)
    """Peak learning rate."""
    minimum: float = Field(default=3e-5, ge=0, le=1)
    """Final learning rate."""
    warmup_steps: int = Field(default=10, ge=0)
    """Linear warmup steps."""
    decay: Literal["constant", "cosine", "wsd"] = "cosine"
    """Shape after warmup."""
    decay_fraction: float = Field(default=0.2, gt=0, le=1)
    """For ``wsd``: fraction of the run spent in the final decay."""


class DataSource(ApiModel):
    """Where training tokens come from."""

    kind: Literal["synthetic", "files"] = "synthetic"
    """``synthetic``: seeded random tokens; ``files``: pre-tokenized shards under ``path``."""
    path: str | None = None
    """Directory of tokenized shards (``files`` only), as seen inside the worker."""

    @model_validator(mode="after")
    def _path_for_files(self) -> DataSource:
        if self.kind == "files" and not self.path:
            raise ValueError("data.path is required when data.kind is 'files'")
        return self


class AnomalyPolicy(ApiModel):
    """How the trainer reacts to loss spikes, NaNs and stragglers."""

    spike_zscore: float = Field(default=6.0, gt=0)
    """A loss this many standard deviations above the window mean is a spike."""
    window: int = Field(default=128, ge=8, le=100000)
    """Steps in the loss statistics window."""
    max_consecutive_skips: int = Field(default=3, ge=1)
    """After this many skipped steps in a row, roll back to the last checkpoint."""
    straggler_factor: float = Field(default=2.0, gt=1)
    """A rank slower than this multiple of the median step time is straggling."""
    straggler_patience: int = Field(default=20, ge=1)
    """Consecutive straggling steps before asking for the node to be replaced."""


class TrainingConfig(ApiModel):
    """Budget, batch, optimisation and stability settings."""

    steps: int | None = Field(default=None, ge=1)
    """Optimizer steps to run; exactly one of steps and tokens is set."""
    tokens: int | None = Field(default=None, ge=1)
    """Token budget; the step count is tokens / (global batch x sequence length)."""
    global_batch_size: int = Field(ge=1, le=1 << 24)
    """Sequences per optimizer step, summed over all data-parallel replicas."""
    sequence_length: int = Field(ge=2, le=1 << 20)
    """Tokens per sequence."""
    seed: int = Field(default=1234, ge=0)
    """Seed for initialisation and synthetic data."""
    lr: LearningRateSchedule = LearningRateSchedule()
    """Learning-rate schedule."""
    weight_decay: float = Field(default=0.1, ge=0)
    """AdamW weight decay."""
    grad_clip: float = Field(default=1.0, gt=0)
    """Global gradient-norm clip."""
    aux_loss_coef: float = Field(default=0.015, ge=0)
    """Load-balance auxiliary loss coefficient."""
    z_loss_coef: float = Field(default=1e-4, ge=0)
    """Router z-loss coefficient."""
    balancing: Literal["aux-loss", "bias"] = "aux-loss"
    """Expert load balancing: auxiliary loss, or auxiliary-loss-free per-expert bias."""
    routing_warmup_steps: int = Field(default=0, ge=0)
    """Steps over which router logits are blended from noise to signal."""
    data: DataSource = DataSource()
    """Token source."""
    anomaly: AnomalyPolicy = AnomalyPolicy()
    """Loss-spike, NaN and straggler handling."""

    @model_validator(mode="after")
    def _one_budget(self) -> TrainingConfig:
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("set exactly one of training.steps and training.tokens")
        if self.steps is None and self.total_steps < 1:
            raise ValueError(
                "training.tokens is smaller than one step "
                f"(globalBatchSize x sequenceLength = {self.tokens_per_step})"
            )
        return self

    @property
    def tokens_per_step(self) -> int:
        """Tokens consumed by one optimizer step."""
        return self.global_batch_size * self.sequence_length

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run."""
        if self.steps is not None:
            return self.steps
        assert self.tokens is not None
        return self.tokens // self.tokens_per_step
