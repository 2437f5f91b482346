"""How long the engine's own work takes per decode step, beside the model's step (issue 16 item 1).

A GPU decode step replays a CUDA graph; whatever the engine does between replays on the host
(building the step's input, sampling, per-request bookkeeping, detokenising, streaming) leaves
the GPU idle unless it is overlapped with the next replay. Before building that overlap, this
measures the work it would hide. It is device-independent Python, so it can be measured here:
the engine runs the static decode path (`static_decode="on"`, the slot pool the GPU uses) on a
checkpoint, and for the "engine alone" rows the static step is replaced by a stand-in that
returns ready logits at once — what remains is everything the engine does per step except the
model. Timed at steady state: the median `Engine._decode` call while exactly `c` requests run
(admission and prefill excluded), greedy, `ignore_eos`, no speculation, no prefix cache.

This is a diagnostic, not a comparison: transformers' `generate` has no scheduler to compare
with. Compare the engine-alone figure with a GPU step (7.5 ms at batch 1 for a 7B model on an
H200, `bench_gpu_serving.py`).

    python -m benchmarks.bench_decode_host [--model runs/mini/stage2] [--new-tokens 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from benchmarks.bench_serving import build_mini_size_model, random_images  # noqa: E402
from seechat.infer.chat import prompt_ids  # noqa: E402
from seechat.infer.engine import Engine, EngineConfig  # noqa: E402
from seechat.infer.sampling import SamplingParams  # noqa: E402
from seechat.model import load  # noqa: E402

QUESTION = "<image>\n请详细描述这张图片里的物体、颜色和位置。"


def step_times(
    engine: Engine, ids: torch.Tensor, concurrency: int, new_tokens: int, seed: int
) -> list[float]:
    """Seconds of each `_decode` call made while exactly `concurrency` requests ran."""
    times: list[float] = []
    decode = engine._decode

    def timed() -> None:
        n, t = len(engine._running), time.perf_counter()
        decode()
        if n == concurrency:
            times.append(time.perf_counter() - t)

    engine._decode = timed  # the engine thread calls self._decode: the instance attribute wins
    images = random_images(concurrency, engine.model.vision_tower.image_size, seed)
    left, done = [concurrency], threading.Event()

    def sink(ev) -> None:
        if ev.finish_reason is not None:
            left[0] -= 1
            if left[0] == 0:
                done.set()

    try:
        for i in range(concurrency):
            engine.submit(
                ids,
                [images[i]],
                SamplingParams(max_new_tokens=new_tokens),
                sink=sink,
                cache_prefix=False,
                ignore_eos=True,
            )
        done.wait()
    finally:
        del engine._decode
    return times


def stand_in(engine: Engine, vocab: int):
    """A static step that returns ready logits (a fixed token wins) without running the model."""
    logits = torch.zeros(engine.runner.slots, 8, vocab)
    logits[..., 100] = 1.0

    def step(tokens: torch.Tensor, kv) -> torch.Tensor:
        return logits[: tokens.shape[0], : tokens.shape[1]]

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/mini/stage2", help="a seechat checkpoint (Qwen2/Llama LM)")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    try:  # called in-process (tests), the thread count must not outlive the call
        if args.threads:
            torch.set_num_threads(args.threads)
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> int:
    ckpt = Path(args.model)
    if not (ckpt / "config.json").is_file():
        print(f"{ckpt} not found: building an untrained mini-size model", flush=True)
        ckpt = build_mini_size_model(Path(tempfile.mkdtemp(prefix="seechat-bench-")))
    model, processor = load(ckpt)
    config = EngineConfig(
        max_batch_size=max(args.concurrency), prefix_cache_mb=0, speculative_tokens=0, static_decode="on"
    )
    ids = prompt_ids(processor, [{"role": "user", "content": QUESTION}], 1)
    vocab = model.language_model.get_output_embeddings().weight.shape[0]
    rows: dict[str, dict[int, list[float]]] = {"engine + model step": {}, "engine alone": {}}
    with Engine(model, processor, config) as engine:
        step = engine.runner.static
        path = engine.runner.decode_path
        seed = 0
        for _ in range(args.repeats):
            for name in rows:
                engine.runner.static = step if name == "engine + model step" else stand_in(engine, vocab)
                for c in args.concurrency:
                    seed += 1
                    ts = step_times(engine, ids, c, args.new_tokens, seed)
                    rows[name].setdefault(c, []).append(statistics.median(ts))
        engine.runner.static = step
    table = {
        name: {
            c: {"median_ms": 1e3 * statistics.median(xs), "min_ms": 1e3 * min(xs), "max_ms": 1e3 * max(xs)}
            for c, xs in by_c.items()
        }
        for name, by_c in rows.items()
    }
    res = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} thread(s)",
        "model": str(args.model),
        "decode_path": path,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "table": table,
    }
    print(f"{res['machine']}; {res['date']}; decode path {path}; median (min-max) of {args.repeats} runs")
    print("| ms per decode step | " + " | ".join(f"c={c}" for c in args.concurrency) + " |")
    print("|---|" + "---|" * len(args.concurrency))
    for name, by_c in table.items():
        cells = [f"{v['median_ms']:.3f} ({v['min_ms']:.3f}-{v['max_ms']:.3f})" for v in by_c.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    alone = table["engine alone"]
    print(
        "engine alone, per running request: "
        + ", ".join(f"c={c} {1e3 * v['median_ms'] / c:.1f} us" for c, v in alone.items())
    )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
