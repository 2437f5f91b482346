"""Options the data verbs share: byte sizes ("512M"), fractions in (0, 1], and the shard limits."""

from __future__ import annotations

import argparse


def byte_size(text: str) -> int:
    """'1G', '512M', '64k' or plain bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    text = text.strip().lower().removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def add_shard_limits(parser: argparse.ArgumentParser, shard: str = "shard") -> None:
    """--samples-per-shard and --max-shard-size (ShardWriter's limits); `shard` names the shards
    in the help ("output shard" where the verb also reads shards)."""
    parser.add_argument(
        "--samples-per-shard", type=int, default=10_000, help=f"max samples per {shard} (default: 10000)"
    )
    parser.add_argument(
        "--max-shard-size",
        type=byte_size,
        default=1 << 30,
        help=f"max bytes per {shard}, e.g. 512M (default: 1G)",
    )
