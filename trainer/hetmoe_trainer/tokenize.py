"""Tokenizer step: turn text files into the byte-level shards :class:`FileSource` reads.

``python -m hetmoe_trainer.tokenize --out DIR [--shard-tokens N] FILE...``

Byte-level on purpose: no vocabulary file to ship or version, any text round-trips,
and the 257-token vocabulary (256 bytes + end-of-document) fits every preset. Each
input file is one document, followed by the end-of-document token.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from hetmoe_trainer.data import SHARD_META

END_OF_DOCUMENT = 256
VOCAB_SIZE = 257


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of ``text`` followed by the end-of-document token, as uint16."""
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)
    return np.append(data, np.uint16(END_OF_DOCUMENT))


def decode(tokens: np.ndarray) -> str:
    """Inverse of :func:`encode` for one document (the end token is dropped)."""
    data = bytes(int(t) for t in tokens if t != END_OF_DOCUMENT)
    return data.decode("utf-8", errors="replace")


def write_corpus(files: list[Path], out: Path, shard_tokens: int) -> int:
    """Write ``shard_XXXXX.bin`` files and ``meta.json`` into ``out``; returns the token count."""
    out.mkdir(parents=True, exist_ok=True)
    stream = np.concatenate([encode(f.read_text(encoding="utf-8")) for f in files])
    for number, start in enumerate(range(0, len(stream), shard_tokens)):
        stream[start : start + shard_tokens].tofile(out / f"shard_{number:05d}.bin")
    meta = {
        "dtype": "uint16",
        "vocab_size": VOCAB_SIZE,
        "tokenizer": "bytes",
        "tokens": len(stream),
    }
    (out / SHARD_META).write_text(json.dumps(meta, indent=1))
    return len(stream)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry."""
    parser = argparse.ArgumentParser(prog="python -m hetmoe_trainer.tokenize", description=__doc__)
    parser.add_argument("files", nargs="+", type=Path, help="UTF-8 text files, one document each")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard")
    args = parser.parse_args(argv)
    count = write_corpus(args.files, args.out, args.shard_tokens)
    print(f"wrote {count} tokens to {args.out}")


if __name__ == "__main__":
    main()
