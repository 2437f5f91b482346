"""The static decode step attending over column buckets vs over its whole KV slot, run eagerly.

The static step (`seechat.infer.static_decode`) used to attend over every column of its KV slot
(4096 tokens by default) and mask those past each row's end; it now reads the first W columns,
W the longest row rounded up to a power of two. This times one step both ways on the same slot
pool, alternating, at Qwen2.5-7B's layer shape (hidden 3584, 28 query / 4 KV heads of 128,
intermediate 18944) with `--layers` layers and the vocabulary cut to 4096 (the LM head is the
same in both), random weights, rows of `--context` tokens. On a GPU the figure that counts is
`bench_gpu_serving.py --whole-slot` (whole engine, CUDA graphs); this one runs anywhere.

    python -m benchmarks.bench_static_columns [--layers 2] [--context 700] [--batch 1 8 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from seechat.infer.kv import BatchKV, SlotKV
from seechat.infer.static_decode import StaticDecoder


def slot_pool(lm, batch: int, context: int, capacity: int, slots: int) -> SlotKV:
    """A slot pool holding `batch` rows of `context` random keys and values."""
    cfg = lm.config
    d = cfg.hidden_size // cfg.num_attention_heads
    dtype, device = lm.dtype, lm.device
    layers = []
    for _ in range(cfg.num_hidden_layers):
        k = torch.randn(batch, cfg.num_key_value_heads, context, d, dtype=dtype, device=device)
        layers.append((k, torch.randn_like(k)))
    filled = BatchKV(
        layers,
        torch.ones(batch, context, dtype=torch.bool, device=device),
        torch.full((batch,), context, device=device),
    )
    kv = SlotKV.like(slots, capacity, filled)
    kv.merge(filled)
    return kv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--context", type=int, default=700, help="tokens in each row")
    parser.add_argument("--capacity", type=int, default=4096, help="the slot (the engine's default)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=5, help="steps per timing")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; median and range reported")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tiny", action="store_true", help="a tiny layer shape: a rehearsal")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    width, heads, kv_heads, inter = (64, 4, 2, 128) if args.tiny else (3584, 28, 4, 18944)
    cfg = Qwen2Config(
        hidden_size=width,
        intermediate_size=inter,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=4096,
        max_position_embeddings=32768,
    )
    lm = Qwen2ForCausalLM(cfg).eval().to(args.device, getattr(torch, args.dtype))
    step = StaticDecoder(lm, args.capacity, graphs=False)
    buckets = step.min_columns
    rows = []
    with torch.inference_mode():
        for b in args.batch:
            kv = slot_pool(lm, b, args.context, args.capacity, max(args.batch))
            tokens = torch.randint(0, cfg.vocab_size, (b, 1), device=args.device)
            times: dict[str, list[float]] = {"whole slot": [], "column buckets": []}
            widths = {}
            for _ in range(args.rounds):
                for name, least in (("whole slot", args.capacity), ("column buckets", buckets)):
                    step.min_columns = least
                    widths[name] = step.columns(kv, 1)
                    step(tokens, kv)  # warm-up; nothing advances, so every step sees the same rows
                    t = time.perf_counter()
                    for _ in range(args.steps):
                        step(tokens, kv)
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    times[name].append((time.perf_counter() - t) / args.steps)
            for name, xs in times.items():
                rows.append(
                    {
                        "batch": b,
                        "attention": name,
                        "columns": widths[name],
                        "median_ms": 1e3 * statistics.median(xs),
                        "min_ms": 1e3 * min(xs),
                        "max_ms": 1e3 * max(xs),
                    }
                )
            whole, bucketed = (statistics.median(times[n]) for n in ("whole slot", "column buckets"))
            print(
                f"b={b}: whole slot {1e3 * whole:.1f} ms, column buckets ({widths['column buckets']} "
                f"columns) {1e3 * bucketed:.1f} ms: {whole / bucketed:.2f}x",
                flush=True,
            )
    res = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python -m benchmarks.bench_static_columns", *sys.argv[1:]]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, {args.device}",
        "shape": f"{'tiny' if args.tiny else 'Qwen2.5-7B'} layers x {args.layers}, vocabulary 4096, "
        f"{args.dtype}",
        "context": args.context,
        "capacity": args.capacity,
        "rows": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
