"""Batch-1 serving of real questions: where speculative drafts come from, against transformers.

`bench_serving.py` asks one question of random-noise images and times exactly n tokens. This one
serves the mini world's val split as a lone user would, one request at a time under the serving
rule (a reply ends at its stop token): each scene in turn gets one of five kinds of request — the
eval's caption, VQA, grounding and detection prompts and a detailed description — so the replies
differ in length and form. Engines, interleaved request by request so that a noisy machine hurts
them alike:

- seechat (default: drafts from the request, then from earlier replies of its cache scope);
- seechat with drafts from the request only (`draft_history_tokens=0`);
- seechat without speculation (`speculative_tokens=0`);
- transformers `LlavaForConditionalGeneration.generate` (greedy), on the `seechat export` copy;
- the same with `prompt_lookup_num_tokens=4`: transformers' own n-gram speculation, the peer a
  user would otherwise pick. With transformers 5.24 it raises on LLaVA ("Image features and image
  tokens do not match") on every request of this workload; the benchmark then says so, records
  the error, and leaves the column out.

Every reply must equal transformers' plain greedy reply (token for token); the benchmark says how
many do. For one that does not, it says at which token each engine's reply leaves transformers',
and how far apart transformers' own top two logits were there: below TIE_MARGIN that is a float
tie, which the order of a sum decides (seechat's decode step and transformers' multiply the same
weights in another order), and the run still passes; any other difference fails it (exit 1).
Measured per engine: decode tokens/s (tokens after the first / time after the first,
summed over requests) and end-to-end tokens/s (all tokens / all time, prefill included), over all
requests and over those after the first `--warmup` (the reply history starts empty).

    python benchmarks/bench_drafts.py --model runs/mini/stage2 --world runs/mini/world [--requests 150]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

KINDS = ("caption", "vqa", "grounding", "detection", "describe")
DESCRIBE_PROMPT = "<image>\n请详细描述这张图片。"
TIE_MARGIN = 1e-4  # top-2 logit gap below which greedy's pick is float noise (fp32 logits of order 10)


def workload(world: Path, n: int) -> list[tuple[str, str, Path]]:
    """(kind, prompt text, image path) for the first n val scenes, kinds in turn."""
    from seechat.data.jsonl import read_jsonl
    from seechat.eval.tasks import CAPTION_PROMPT, DETECTION_PROMPT, GROUNDING_PROMPT, VQA_PROMPT

    val = world / "val"
    rows = {
        "caption": list(read_jsonl(val / "captions.jsonl")),
        "vqa": list(read_jsonl(val / "vqa.jsonl"))[::2],  # one question per scene
        "grounding": list(read_jsonl(val / "grounding.jsonl")),
        "detection": list(read_jsonl(val / "detection.jsonl")),
        "describe": list(read_jsonl(val / "captions.jsonl")),
    }
    prompts = {
        "caption": lambda r: CAPTION_PROMPT,
        "vqa": lambda r: VQA_PROMPT.format(question=r["question"]),
        "grounding": lambda r: GROUNDING_PROMPT.format(expr=r["expression"]),
        "detection": lambda r: DETECTION_PROMPT.format(question=r["question"]),
        "describe": lambda r: DESCRIBE_PROMPT,
    }
    scenes = min(len(v) for v in rows.values())
    if n > scenes:
        raise SystemExit(f"--requests {n}: the val split has {scenes} scenes")
    out = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        row = rows[kind][i]
        out.append((kind, prompts[kind](row), world / row["image"]))
    return out


class Engines:
    """The five engines of the module docstring, each answering one request at a time."""

    def __init__(
        self, ckpt: Path, llava_dir: Path, max_new: int, temperature: float = 0.0, speculative_tokens: int = 4
    ):
        from transformers import LlavaForConditionalGeneration

        from seechat.infer.engine import Engine, EngineConfig
        from seechat.model import load

        self.model, self.processor = load(ckpt)
        self.llava = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
        self.stop_ids = list(self.processor.stop_token_ids)
        self.max_new = max_new
        self.temperature = temperature  # 0: greedy; else sampled, unseeded, on every side
        configs = {
            "seechat": EngineConfig(prefix_cache_mb=0, speculative_tokens=speculative_tokens),
            "seechat, drafts from the request only": EngineConfig(
                prefix_cache_mb=0, draft_history_tokens=0, speculative_tokens=speculative_tokens
            ),
            "seechat, no speculation": EngineConfig(prefix_cache_mb=0, speculative_tokens=0),
        }
        self.engines = {name: Engine(self.model, self.processor, c).start() for name, c in configs.items()}
        self.names = [*self.engines, "transformers", "transformers, prompt lookup"]

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()

    def run(self, name: str, ids: torch.Tensor, image) -> tuple[list[int], list[float], float]:
        """-> (reply tokens, the time each token arrived, the submit time)."""
        if name in self.engines:
            return self._engine(name, ids, image)
        return self._hf(ids, image, prompt_lookup=name.endswith("prompt lookup"))

    def reference_margin(self, ids: torch.Tensor, image, reply: list[int], at: int) -> float:
        """transformers' own top-2 logit margin where its greedy reply took token `at`: how close
        the model was to a tie, which float summation order alone can turn."""
        seq = torch.cat([ids, torch.tensor(reply[:at], dtype=ids.dtype)])
        pixels = self.processor.preprocess_images([image])
        with torch.inference_mode():
            logits = self.llava(input_ids=seq[None], pixel_values=pixels).logits
        top = logits[0, -1].float().topk(2).values
        return float(top[0] - top[1])

    def _engine(self, name, ids, image):
        from seechat.infer.sampling import SamplingParams

        tokens: list[int] = []
        times: list[float] = []
        done = threading.Event()

        def sink(ev):
            now = time.perf_counter()
            tokens.extend(ev.token_ids)
            times.extend([now] * len(ev.token_ids))
            if ev.finish_reason is not None:
                done.set()

        t0 = time.perf_counter()
        self.engines[name].submit(
            ids,
            [image],
            SamplingParams(max_new_tokens=self.max_new, temperature=self.temperature),
            sink=sink,
            cache_prefix=False,
        )
        done.wait()
        return tokens, times, t0

    def _hf(self, ids, image, prompt_lookup: bool):
        from transformers.generation.streamers import BaseStreamer

        class Clock(BaseStreamer):
            def __init__(self):
                self.times: list[float] = []
                self.sizes: list[int] = []

            def put(self, value):
                self.times.append(time.perf_counter())
                self.sizes.append(value.numel())

            def end(self):
                pass

        clock = Clock()
        t0 = time.perf_counter()
        pixels = self.processor.preprocess_images([image])
        extra = {"prompt_lookup_num_tokens": 4} if prompt_lookup else {}
        with torch.inference_mode():
            out = self.llava.generate(
                input_ids=ids[None],
                pixel_values=pixels,
                max_new_tokens=self.max_new,
                do_sample=self.temperature > 0,
                **(
                    {"temperature": self.temperature, "top_k": 0, "top_p": 1.0}  # as SamplingParams
                    if self.temperature > 0
                    else {}
                ),
                eos_token_id=self.stop_ids,
                pad_token_id=self.processor.tokenizer.pad_token_id,
                streamer=clock,
                **extra,
            )
        tokens = out[0, ids.numel() :].tolist()
        times = [t for t, n in zip(clock.times[1:], clock.sizes[1:], strict=True) for _ in range(n)]
        if tokens and tokens[-1] in self.stop_ids:  # the engine does not report its stop token
            tokens, times = tokens[:-1], times[:-1]
        return tokens, times[: len(tokens)], t0


def first_difference(a: list[int], b: list[int]) -> int:
    """The first token index at which two replies differ (the shorter one's length if one is the
    other's prefix)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def summarize(rows: list[dict], names: list[str], skip: int) -> dict[str, dict[str, float]]:
    out = {}
    for name in names:
        cells = [r[name] for r in rows[skip:]]
        dec_tok = sum(c["tokens"] - 1 for c in cells if c["tokens"] > 1)
        dec_s = sum(c["decode_s"] for c in cells if c["tokens"] > 1)
        out[name] = {
            "decode_tok_s": dec_tok / dec_s if dec_s else 0.0,
            "end_to_end_tok_s": sum(c["tokens"] for c in cells) / sum(c["total_s"] for c in cells),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/mini/stage2", help="an mlp2x_gelu seechat checkpoint")
    parser.add_argument("--world", default="runs/mini/world", help="a mini world (its val split is served)")
    parser.add_argument("--requests", type=int, default=150, help="val scenes served, one request each")
    parser.add_argument("--warmup", type=int, default=50, help="also report the requests after this many")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument(
        "--speculative-tokens", type=int, default=4, help="drafts per verify step of the speculating engines"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 (default): greedy, every reply checked against transformers'; > 0: every side samples "
        "at this temperature, unseeded (seechat by speculative sampling), and replies are not compared",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())

    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    from seechat.data.images import load_image_file
    from seechat.infer.chat import prompt_ids
    from seechat.model.export import export_llava_hf

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tmp = Path(tempfile.mkdtemp(prefix="seechat-bench-drafts-"))
    export_llava_hf(Path(args.model), tmp / "llava")
    bench = Engines(
        Path(args.model), tmp / "llava", args.max_new_tokens, args.temperature, args.speculative_tokens
    )
    work = workload(Path(args.world), args.requests)
    sampled = args.temperature > 0
    rows, same, kinds_same, failed, differ = [], 0, {k: [0, 0] for k in KINDS}, {}, []
    # the warm-up: the first prompt about a blank image, so no timed request's reply is drafted from
    first_ids = prompt_ids(bench.processor, [{"role": "user", "content": work[0][1]}], 1)
    blank = Image.new("RGB", load_image_file(work[0][2]).size, (128, 128, 128))
    for name in list(bench.names):
        try:
            bench.run(name, first_ids, blank)
        except Exception as e:
            failed[name] = f"{type(e).__name__}: {e}"
            bench.names.remove(name)
            print(f"{name} fails on this workload, left out: {failed[name]}", flush=True)
    for i, (kind, text, path) in enumerate(tqdm(work, desc="requests", unit="req")):
        ids = prompt_ids(bench.processor, [{"role": "user", "content": text}], 1)
        image = load_image_file(path)
        row, replies = {"kind": kind}, {}
        for name in bench.names:
            tokens, times, t0 = bench.run(name, ids, image)
            replies[name] = tokens
            row[name] = {
                "tokens": len(tokens),
                "decode_s": times[-1] - times[0] if len(times) > 1 else 0.0,
                "total_s": (times[-1] if times else time.perf_counter()) - t0,
            }
        agree = sampled or all(r == replies["transformers"] for r in replies.values())
        if not agree:  # where each engine's reply first leaves transformers', to look into
            ref = replies["transformers"]
            at = {n: first_difference(r, ref) for n, r in replies.items() if r != ref}
            gap = {j: bench.reference_margin(ids, image, ref, j) for j in set(at.values())}
            differ.append(
                {
                    "request": i,
                    "kind": kind,
                    "image": str(path),
                    "transformers_tokens": len(ref),
                    "first_difference": at,
                    "transformers_top2_margin": {n: gap[j] for n, j in at.items()},
                    "tie": all(g < TIE_MARGIN for g in gap.values()),
                }
            )
        same += agree
        kinds_same[kind][0] += agree
        kinds_same[kind][1] += 1
        rows.append(row)
    counters = {name: dict(engine.counters) for name, engine in bench.engines.items()}
    bench.close()

    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    results = {
        "all": summarize(rows, bench.names, 0),
        f"after {args.warmup}": summarize(rows, bench.names, args.warmup),
    }
    spec = counters["seechat"]
    accept = spec["accepted_drafts"] / max(1, spec["draft_tokens"])
    print(
        f"\nmachine: {machine}; load average before: {load_before}; model: {args.model}; "
        f"{args.requests} val requests ({', '.join(KINDS)} in turn), "
        f"at most {args.max_new_tokens} tokens each; "
        + (
            f"sampled at temperature {args.temperature} (replies not compared); "
            if sampled
            else f"replies equal to transformers' greedy: {same}/{len(rows)}; "
        )
        + f"seechat drafts accepted: {accept:.0%}, "
        f"{spec['history_drafts'] / max(1, spec['draft_tokens']):.0%} of them from earlier replies"
    )
    for d in differ:
        print(
            f"request {d['request']} ({d['kind']}, {d['image']}): first token that differs from "
            f"transformers' ({d['transformers_tokens']} tokens): {d['first_difference']}; there, "
            "transformers' top two logits differ by "
            + ", ".join(f"{g:.2g}" for g in sorted(set(d["transformers_top2_margin"].values())))
            + (" (a float tie)" if d["tie"] else "")
        )
    ref = "transformers"
    for part, table in results.items():
        print(f"\nrequests: {part}")
        print("| | decode tok/s | vs transformers | end-to-end tok/s | vs transformers |")
        print("|---|---|---|---|---|")
        for name, cell in table.items():
            dec, e2e = cell["decode_tok_s"], cell["end_to_end_tok_s"]
            print(
                f"| {name} | {dec:.1f} | {dec / table[ref]['decode_tok_s']:.2f}x | "
                f"{e2e:.1f} | {e2e / table[ref]['end_to_end_tok_s']:.2f}x |"
            )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": machine,
                    "command": " ".join(sys.argv),
                    "results": results,
                    "temperature": args.temperature,
                    "speculative_tokens": args.speculative_tokens,
                    "replies_equal": None if sampled else same,
                    "failed": failed,
                    "requests": len(rows),
                    "replies_equal_by_kind": kinds_same,
                    "replies_that_differ": differ,
                    "counters": counters,
                    "tokens_by_kind": {
                        k: sum(r["seechat"]["tokens"] for r in rows if r["kind"] == k) for k in KINDS
                    },
                    "load_average_before": load_before,
                    "load_average_after": " ".join(f"{x:.1f}" for x in os.getloadavg()),
                },
                indent=2,
            )
        )
    return 0 if sampled or all(d["tie"] for d in differ) else 1


if __name__ == "__main__":
    sys.exit(main())
