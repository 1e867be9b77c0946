"""Local mode's simulated grades: the trainer stretches compute by the pool's factor."""

from __future__ import annotations

import pytest

from hetmoe_trainer.__main__ import SLOWDOWN_ENV, simulated_slowdown
from hetmoe_trainer.loop import simulated_delay


def test_delay_makes_compute_take_the_factor_times_as_long() -> None:
    assert simulated_delay(0.2, 1.0) == 0.0
    assert simulated_delay(0.2, 2.5) == pytest.approx(0.3)
    assert simulated_delay(-1.0, 3.0) == 0.0


def test_factor_comes_from_the_environment() -> None:
    assert simulated_slowdown({}) == 1.0
    assert simulated_slowdown({SLOWDOWN_ENV: "1.667"}) == pytest.approx(1.667)


@pytest.mark.parametrize("text", ["fast", "0.5", "1000"])
def test_bad_factor_is_a_configuration_error(text: str) -> None:
    with pytest.raises(ValueError, match=SLOWDOWN_ENV):
        simulated_slowdown({SLOWDOWN_ENV: text})
