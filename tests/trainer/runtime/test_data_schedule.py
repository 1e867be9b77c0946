"""Data addressing, the tokenizer step, the LR schedule and the optimizer groups."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hetmoe_operator.api.training import DataSource, LearningRateSchedule
from hetmoe_operator.plan import ReplicaPlan
from hetmoe_trainer.data import MarkovSource, SampleStream, build_source, replica_slice
from hetmoe_trainer.schedule import learning_rate
from hetmoe_trainer.tokenize import VOCAB_SIZE, decode, write_corpus


def test_synthetic_samples_depend_only_on_their_index() -> None:
    a, b = MarkovSource(512, 16, seed=3), MarkovSource(512, 16, seed=3)
    assert np.array_equal(a.sample(41), b.sample(41))
    assert not np.array_equal(a.sample(41), a.sample(42))
    assert a.sample(0).shape == (17,) and a.sample(0).max() < 512


def test_stream_counter_skips_rolled_back_ranges() -> None:
    stream = SampleStream()
    assert stream.take(4) == [0, 1, 2, 3]
    stream.skip_ranges.append((4, 10))
    assert stream.take(3) == [10, 11, 12] and stream.consumed == 13
    again = SampleStream()
    again.load_state_dict(stream.state_dict())
    assert again.take(1) == [13]


def test_skipped_ranges_merge_and_stay_sorted() -> None:
    stream = SampleStream()
    stream.skip(16, 40)
    stream.skip(50, 60)
    stream.skip(16, 64)  # a later rollback's streak that began at the same position
    stream.skip(2, 4)
    assert stream.skip_ranges == [(2, 4), (16, 64)]
    assert stream.take(6) == [0, 1, 4, 5, 6, 7]
    stream.consumed = 15
    assert stream.take(2) == [15, 64]


def test_replicas_take_contiguous_slices_of_the_global_batch() -> None:
    replicas = [
        ReplicaPlan(dp_index=1, samples_per_step=2, microbatch_size=1, num_microbatches=2),
        ReplicaPlan(dp_index=0, samples_per_step=6, microbatch_size=3, num_microbatches=2),
    ]
    assert replica_slice(replicas, 0) == slice(0, 6)
    assert replica_slice(replicas, 1) == slice(6, 8)


def test_tokenized_files_round_trip(tmp_path: Path) -> None:
    text = tmp_path / "doc.txt"
    text.write_text("hetmoe trains mixtures of experts. " * 20)
    corpus = tmp_path / "corpus"
    count = write_corpus([text], corpus, shard_tokens=100)
    assert count == len(text.read_bytes()) + 1 and len(list(corpus.glob("*.bin"))) > 1
    source = build_source(DataSource(kind="files", path=str(corpus)), VOCAB_SIZE, 15, 0)
    seen = [source.sample(i) for i in range(count // 16)]
    assert all(s.shape == (16,) for s in seen)
    assert "".join(decode(s) for s in seen) != ""
    with pytest.raises(ValueError, match="vocabulary"):
        build_source(DataSource(kind="files", path=str(corpus)), 100, 15, 0)


@pytest.mark.parametrize("decay", ["constant", "cosine", "wsd"])
def test_learning_rate_schedules(decay: str) -> None:
    schedule = LearningRateSchedule(peak=1.0, minimum=0.1, warmup_steps=10, decay=decay)
    rates = [learning_rate(schedule, s, 100) for s in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    if decay == "constant":
        assert rates[-1] == 1.0
    elif decay == "cosine":
        assert rates[-1] == pytest.approx(0.1, abs=1e-3) and rates[50] < rates[20]
    else:
        assert rates[79] == 1.0 and rates[-1] == pytest.approx(0.1)
