"""The training loss over Qwen2.5-7B's vocabulary: the LM head fused with the cross-entropy
(`seechat.model.fused_loss`, the default) vs the plain path (head, float32 cast, `F.cross_entropy`).

Times one forward and backward of the loss alone at the 7B's head shape (hidden 3584, vocabulary
152,064, bf16), for K supervised tokens, with the gradients stage 2 needs (hidden states and head
weight) or stage 1's (hidden states only, the head frozen), and measures the memory the step adds
above its inputs and weights:
- on a GPU, `torch.cuda.max_memory_allocated` above what was allocated before the step;
- on a CPU, the process's peak resident memory above its resident memory before the step. Each
  (path, K) runs in a fresh process for this, set up without temporaries (`--one`), so the peak is
  the step's own.

`--chunks 25 26 27` times the fused path with 2^25, 2^26 and 2^27 logits per chunk (the library's
default is 2^25): smaller chunks hold less, larger ones re-read the head's weight and gradient less
often (each chunk reads the 1 GiB weight twice and reads and writes its gradient once).

What the plain path is, exactly: `head(hidden)`, then `seechat.model.modeling.token_loss` (a float32
copy of the logits, `F.cross_entropy(..., reduction="sum")`), as training computes it when fusing
is off.
Memory here does not depend on the device's speed; the times are the device's.

    python -m benchmarks.bench_fused_loss --tokens 1024 4096 --json benchmarks/results/fused_loss_cpu.json
    python -m benchmarks.bench_fused_loss --device cuda --repeats 5 --chunks 25 26 27   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from seechat.model import fused_loss
from seechat.model.fused_loss import chunk_tokens, head_cross_entropy
from seechat.model.modeling import token_loss


def plain_loss(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, weights: torch.Tensor):
    """The loss as training computes it with fusing off under `train.loss_average=token` (every
    weight 1): the head's logits, then `token_loss`, summed (divided by 1)."""
    return token_loss(head(hidden)[None], targets[None], num_items_in_batch=1)[0]


LOSSES = {"plain": plain_loss, "fused": head_cross_entropy}


def setup(tokens: int, hidden: int, vocab: int, device: torch.device, train_head: bool, seed: int = 0):
    """Inputs in bf16, drawn in place (no float32 temporaries that would raise the peak before the step)."""
    torch.manual_seed(seed)
    head = nn.Linear(hidden, vocab, bias=False, device="meta").to_empty(device=device).to(torch.bfloat16)
    with torch.no_grad():
        head.weight.normal_(0, hidden**-0.5)
    head.weight.requires_grad_(train_head)
    h = torch.empty(tokens, hidden, dtype=torch.bfloat16, device=device).normal_().requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device=device)
    weights = torch.ones(tokens, device=device)
    return h, head, targets, weights


def step(loss_fn, h, head, targets, weights) -> float:
    """One forward and backward of `loss_fn` (a `LOSSES` value); returns the loss."""
    h.grad, head.weight.grad = None, None
    loss = loss_fn(h, head, targets, weights) / len(targets)
    loss.backward()
    return float(loss.detach())


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def current_rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def one(path: str, tokens: int, args) -> dict:
    """One (path, K) measured in this process: its memory and the time of `args.repeats` steps.
    `path`: "plain", or "fused" with chunks of 2^n logits as "fused:n"."""
    kind, _, log2 = path.partition(":")
    library_chunk = fused_loss.CHUNK_ELEMENTS
    if log2:
        fused_loss.CHUNK_ELEMENTS = 1 << int(log2)
    try:
        return measure(kind, path, tokens, args)
    finally:  # the library's own chunk size again for whoever runs next in this process
        fused_loss.CHUNK_ELEMENTS = library_chunk


def measure(kind: str, path: str, tokens: int, args) -> dict:
    """The body of `one`, with the row's chunk size already set."""
    device = torch.device(args.device)
    h, head, targets, weights = setup(tokens, args.hidden, args.vocab, device, args.train_head)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**30
    else:
        before, before_peak = current_rss_gib(), peak_rss_gib()
    times, loss = [], 0.0
    for _ in range(args.warmup + args.repeats):
        t0 = time.perf_counter()
        loss = step(LOSSES[kind], h, head, targets, weights)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times = times[args.warmup :]
    row = {
        "path": path,
        "tokens": tokens,
        "chunk_tokens": chunk_tokens(args.vocab) if kind == "fused" else None,
        "loss": round(loss, 6),
        "step_s": round(statistics.median(times), 4),
        "step_s_range": [round(min(times), 4), round(max(times), 4)],
    }
    if cuda:
        row["extra_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30 - before, 2)
    else:
        row["extra_memory_gib"] = round(peak_rss_gib() - before, 2)
        # the setup's own peak, which stays below `before` plus the step's
        row["peak_before_step_gib"] = round(before_peak, 2)
        row["rss_before_step_gib"] = round(before, 2)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096], help="supervised tokens K")
    ap.add_argument("--hidden", type=int, default=3584)
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument(
        "--frozen-head", dest="train_head", action="store_false", help="stage 1: no gradient for the head"
    )
    ap.add_argument(
        "--chunks",
        type=int,
        nargs="+",
        default=[fused_loss.CHUNK_ELEMENTS.bit_length() - 1],
        help="the fused path's chunk sizes to time, as log2 of the logits per chunk (default: the "
        "library's, %(default)s)",
    )
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--json", default="")
    ap.add_argument("--one", nargs=2, metavar=("PATH", "K"), help=argparse.SUPPRESS)  # a child process
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args)))
        return []
    rows = []
    for tokens in args.tokens:
        for path in ["plain", *(f"fused:{n}" for n in args.chunks)]:
            if args.device == "cpu":  # a fresh process per row: its peak is the row's own
                child = [sys.executable, "-m", "benchmarks.bench_fused_loss", "--one", path, str(tokens)]
                child += ["--device", "cpu", "--hidden", str(args.hidden), "--vocab", str(args.vocab)]
                child += ["--repeats", str(args.repeats), "--warmup", str(args.warmup)]
                child += [] if args.train_head else ["--frozen-head"]
                out = subprocess.run(child, capture_output=True, text=True, check=True).stdout
                row = json.loads(out.strip().splitlines()[-1])
            else:
                row = one(path, tokens, args)
                torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)
            rows.append(row)
    info = {
        "command": "python -m benchmarks.bench_fused_loss "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shape": {
            "hidden": args.hidden,
            "vocab": args.vocab,
            "dtype": "bfloat16",
            "head_trains": args.train_head,
        },
    }
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
