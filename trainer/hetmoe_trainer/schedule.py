"""Learning-rate schedule: linear warmup, then constant, cosine or warmup-stable-decay.

A pure function of the step, so resuming needs only the step counter and every
rank computes the same rate without communicating.
"""

from __future__ import annotations

import math

from hetmoe_operator.api.training import LearningRateSchedule


def learning_rate(schedule: LearningRateSchedule, step: int, total_steps: int) -> float:
    """Rate for optimizer step ``step`` (0-based) of a ``total_steps`` run."""
    if step < schedule.warmup_steps:
        return schedule.peak * (step + 1) / schedule.warmup_steps
    if schedule.decay == "constant":
        return schedule.peak
    if schedule.decay == "cosine":
        span = max(1, total_steps - schedule.warmup_steps)
        progress = min(1.0, (step - schedule.warmup_steps) / span)
        return schedule.minimum + (schedule.peak - schedule.minimum) * 0.5 * (
            1.0 + math.cos(math.pi * progress)
        )
    # wsd: hold the peak, then decay linearly to the minimum over the final fraction.
    decay_steps = max(1, round(schedule.decay_fraction * total_steps))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return schedule.peak
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return schedule.peak + (schedule.minimum - schedule.peak) * progress
