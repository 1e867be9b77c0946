"""Deterministic, resumable token data addressed by a global sample index.

Every sequence of the training stream has a global index; sample ``i`` is the same
``sequence_length + 1`` tokens whatever the pipeline, expert or data-parallel layout,
because it is computed from ``(seed, i)`` (synthetic) or read from fixed file offsets
(files). Progress is one integer, the *consumed-samples counter* of the
:class:`SampleStream`, so a run resumed on a different number of replicas continues
at the very next sample (per-rank loader state cannot follow a change of world size).

A step's global batch is ``global_batch_size`` consecutive stream indices; replica
``r`` takes the contiguous slice starting at the sum of the earlier replicas'
``samples_per_step`` (see :func:`replica_slice`), so uneven replicas together still
see exactly the global batch.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from hetmoe_operator.api.training import DataSource
from hetmoe_operator.plan import ReplicaPlan

SHARD_META = "meta.json"
"""Name of the metadata file next to the ``*.bin`` shards (dtype, vocab size)."""


class TokenSource(Protocol):
    """Maps a global sample index to its tokens."""

    def sample(self, index: int) -> np.ndarray:
        """``sequence_length + 1`` token ids (inputs and the shifted targets)."""
        ...


class MarkovSource:
    """Synthetic, learnable tokens: walks of a fixed random Markov chain.

    Each token has ``branching`` possible successors drawn once from the seed, taken
    with skewed fixed probabilities, so a model can learn the transition table and
    the loss visibly falls from ``ln(vocab)`` towards the chain's entropy (about 1.1
    nats) instead of staying flat as with uniform random tokens.
    """

    def __init__(self, vocab_size: int, sequence_length: int, seed: int, branching: int = 4):
        table_rng = np.random.default_rng([seed, 0x4D41524B])
        self._successors = table_rng.integers(0, vocab_size, size=(vocab_size, branching))
        weights = 0.45 ** np.arange(branching)
        self._probs = weights / weights.sum()
        self._vocab_size = vocab_size
        self._length = sequence_length + 1
        self._seed = seed

    def sample(self, index: int) -> np.ndarray:
        """The walk of sample ``index``: its own start token and successor choices."""
        rng = np.random.default_rng([self._seed, 1, index])
        choices = rng.choice(len(self._probs), size=self._length - 1, p=self._probs)
        out = np.empty(self._length, dtype=np.int64)
        out[0] = rng.integers(self._vocab_size)
        for t, choice in enumerate(choices):
            out[t + 1] = self._successors[out[t], choice]
        return out


class FileSource:
    """Pre-tokenized ``*.bin`` shards (uint16 or uint32) read as one token stream.

    The stream is cut into non-overlapping windows of ``sequence_length + 1`` tokens;
    every pass over the windows (an epoch) visits them in a seeded permutation, so
    sample ``i`` is window ``perm_{i // n}[i % n]``.
    """

    def __init__(self, path: Path, vocab_size: int, sequence_length: int, seed: int):
        meta_path = path / SHARD_META
        if not meta_path.is_file():
            raise ValueError(
                f"data.path {path} has no {SHARD_META} (make it with hetmoe_trainer.tokenize)"
            )
        meta = json.loads(meta_path.read_text())
        if int(meta["vocab_size"]) > vocab_size:
            raise ValueError(
                f"tokenized data uses a vocabulary of {meta['vocab_size']}, "
                f"the model only {vocab_size}"
            )
        dtype = np.dtype(meta["dtype"])
        if dtype not in (np.uint16, np.uint32):
            raise ValueError(f"shard dtype must be uint16 or uint32, not {dtype}")
        shards = sorted(path.glob("*.bin"))
        if not shards:
            raise ValueError(f"data.path {path} holds no *.bin shards")
        self._shards = [np.memmap(s, dtype=dtype, mode="r") for s in shards]
        self._starts = list(np.cumsum([0] + [len(s) for s in self._shards[:-1]]))
        total = sum(len(s) for s in self._shards)
        self._length = sequence_length + 1
        self._windows = total // self._length
        if self._windows < 1:
            raise ValueError(f"data.path {path} holds fewer tokens than one sequence")
        self._seed = seed
        self._perm: tuple[int, np.ndarray] | None = None

    def _window(self, index: int) -> int:
        epoch, position = divmod(index, self._windows)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (
                epoch,
                np.random.default_rng([self._seed, 2, epoch]).permutation(self._windows),
            )
        return int(self._perm[1][position])

    def sample(self, index: int) -> np.ndarray:
        """Tokens of window ``perm(index)``, possibly spanning two shards."""
        start = self._window(index) * self._length
        pieces, need = [], self._length
        shard = bisect.bisect_right(self._starts, start) - 1
        offset = start - self._starts[shard]
        while need:
            piece = self._shards[shard][offset : offset + need]
            pieces.append(piece)
            need -= len(piece)
            shard, offset = shard + 1, 0
        return np.concatenate(pieces).astype(np.int64)


def build_source(data: DataSource, vocab_size: int, sequence_length: int, seed: int) -> TokenSource:
    """The token source a plan's ``training.data`` asks for."""
    if data.kind == "synthetic":
        return MarkovSource(vocab_size, sequence_length, seed)
    assert data.path is not None
    return FileSource(Path(data.path), vocab_size, sequence_length, seed)


@dataclass
class SampleStream:
    """The global consumed-samples counter, with sample ranges rolled back over.

    ``skip_ranges`` are half-open ``[start, end)`` index ranges that anomaly rollback
    declared bad; :meth:`take` steps over them, so they are never trained on again.
    """

    consumed: int = 0
    skip_ranges: list[tuple[int, int]] = field(default_factory=list)

    def take(self, count: int) -> list[int]:
        """The next ``count`` sample indices; advances the counter."""
        indices, position = [], self.consumed
        while len(indices) < count:
            for start, end in self.skip_ranges:
                if start <= position < end:
                    position = end
            indices.append(position)
            position += 1
        self.consumed = position
        return indices

    def skip(self, start: int, end: int) -> None:
        """Never train on samples ``[start, end)``; overlapping ranges are merged, sorted."""
        merged: list[tuple[int, int]] = []
        for a, b in sorted([*self.skip_ranges, (start, end)]):
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self.skip_ranges = merged

    def state_dict(self) -> dict:
        """JSON-serialisable state."""
        return {"consumed": self.consumed, "skip_ranges": [list(r) for r in self.skip_ranges]}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`."""
        self.consumed = int(state["consumed"])
        self.skip_ranges = [(int(a), int(b)) for a, b in state["skip_ranges"]]


def replica_slice(replicas: list[ReplicaPlan], dp_index: int) -> slice:
    """Positions of replica ``dp_index``'s samples within every global batch."""
    ordered = sorted(replicas, key=lambda r: r.dp_index)
    start = sum(r.samples_per_step for r in ordered if r.dp_index < dp_index)
    return slice(start, start + ordered[dp_index].samples_per_step)


def batch_tensors(
    source: TokenSource, indices: list[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets ``[len(indices), sequence_length]`` (int64) on ``device``."""
    tokens = torch.from_numpy(np.stack([source.sample(i) for i in indices]))
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device)
