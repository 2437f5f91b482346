"""Serving benchmark: seechat's engine vs transformers' LlavaForConditionalGeneration.generate.

Both run in one process on the same weights (the seechat checkpoint and its `seechat export
--format llava-hf` copy), same prompts, greedy, exactly `--new-tokens` tokens per request, runs
interleaved so that a noisy machine hurts both alike. Both sides decode under one rule: a stop
token (`<|im_end|>`) is an ordinary token in the timed runs — the engine's `ignore_eos` lets it
through, and transformers runs with no `eos_token_id` (not `min_new_tokens`, which would mask it
and make a trained model continue differently). Before timing, `greedy_agreement` checks that
the engines give transformers' tokens under that rule and under the serving rule (both stop at
the first stop token). Measured:

- time to first token (image encode + prefill + first token), batch 1;
- decode tokens/s at batch 1 (tokens after the first / time after the first);
- aggregate tokens/s with 1, 8, 32 concurrent requests: the engine gets them all at once and
  batches them continuously; transformers gets its best case, one left-padded `generate` batch.

Engines: seechat's default, seechat with speculative drafts from the request only
(`draft_history_tokens=0`: no drafts from earlier replies) and seechat without speculation.
Each request has its own random image, so the engine's image-feature cache never helps, and the
prefix cache is off; every request asks the same question, so the default engine's drafts from
earlier replies meet their best case here (`bench_drafts.py` serves a mixed workload). With no
`--model` (or a missing one) an untrained mini-size `mlp2x_gelu` model is built (speed does not
depend on weight values).

    python benchmarks/bench_serving.py [--model runs/mini/stage2] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from seechat.model.checkpoint import write_checkpoint

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def build_mini_size_model(root: Path) -> Path:
    """An untrained model of the mini world's size: ChineseCLIP-like ViT (64 px, patch 8, hidden 128,
    4 layers) + Qwen2 (hidden 256, 4 layers, ~1000-token character vocabulary), mlp2x_gelu bridge."""
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        ChineseCLIPVisionConfig,
        CLIPImageProcessor,
        Qwen2Config,
    )

    from seechat.config import BridgeConfig, LMConfig, ModelConfig, VisionConfig
    from seechat.data.char_tokenizer import build_char_tokenizer
    from seechat.model import build

    torch.manual_seed(0)
    vision_cfg = ChineseCLIPVisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=64,
        patch_size=8,
    )
    AutoModel.from_config(vision_cfg).save_pretrained(root / "vision")
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(
        root / "vision"
    )
    tokenizer = build_char_tokenizer(extra_chars=[chr(0x4E00 + i) for i in range(880)])
    lm_cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    AutoModelForCausalLM.from_config(lm_cfg).save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm" / "tokenizer")
    cfg = ModelConfig(
        vision=VisionConfig(path=str(root / "vision")),
        lm=LMConfig(path=str(root / "lm"), tokenizer_path=str(root / "lm" / "tokenizer")),
        bridge=BridgeConfig(type="mlp2x_gelu"),
    )
    model, processor = build(cfg)
    write_checkpoint(model, processor, root / "ckpt")
    return root / "ckpt"


def random_images(n: int, size: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


class Bench:
    def __init__(self, ckpt: Path, llava_dir: Path, new_tokens: int, max_batch: int):
        from transformers import LlavaForConditionalGeneration

        from seechat.infer.chat import prompt_ids
        from seechat.infer.engine import Engine, EngineConfig
        from seechat.model import load

        self.model, self.processor = load(ckpt)
        self.llava = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
        # The timed runs treat stop tokens as ordinary tokens on both sides (see the module docstring):
        # transformers gets them back per call, for the serving rule only.
        self.stop_ids = list(self.processor.stop_token_ids)
        self.llava.generation_config.eos_token_id = None
        self.engines = {
            "seechat": Engine(
                self.model, self.processor, EngineConfig(max_batch_size=max_batch, prefix_cache_mb=0)
            ),
            "seechat, drafts from the request only": Engine(
                self.model,
                self.processor,
                EngineConfig(max_batch_size=max_batch, prefix_cache_mb=0, draft_history_tokens=0),
            ),
            "seechat, no speculation": Engine(
                self.model,
                self.processor,
                EngineConfig(max_batch_size=max_batch, prefix_cache_mb=0, speculative_tokens=0),
            ),
        }
        for engine in self.engines.values():
            engine.start()
        self.n = new_tokens
        self.image_size = self.model.vision_tower.image_size
        question = [{"role": "user", "content": "<image>\n请详细描述这张图片里的物体、颜色和位置。"}]
        self.ids = prompt_ids(self.processor, question, 1)
        self.seed = 0

    def _images(self, n: int) -> list[Image.Image]:
        self.seed += 1
        return random_images(n, self.image_size, self.seed)

    # ---------------------------------------------------------------- seechat engine

    def engine_run(self, name: str, concurrency: int) -> dict:
        from seechat.infer.sampling import SamplingParams

        images = self._images(concurrency)
        params = SamplingParams(max_new_tokens=self.n)
        stamps: list[list[tuple[float, int]]] = [[] for _ in range(concurrency)]
        done = [False] * concurrency
        import threading

        all_done = threading.Event()

        def sink(i):
            def put(ev):
                stamps[i].append((time.perf_counter(), len(ev.token_ids)))
                if ev.finish_reason is not None:
                    done[i] = True
                    if all(done):
                        all_done.set()

            return put

        t0 = time.perf_counter()
        for i in range(concurrency):
            self.engines[name].submit(
                self.ids, [images[i]], params, sink=sink(i), cache_prefix=False, ignore_eos=True
            )
        all_done.wait()
        t1 = time.perf_counter()
        tokens = sum(n for s in stamps for _, n in s)
        first = stamps[0][0][0]
        last = stamps[0][-1][0]
        return {
            "ttft_s": first - t0,
            "decode_tok_s": (self.n - 1) / (last - first),
            "agg_tok_s": tokens / (t1 - t0),
            "tokens": tokens,
        }

    def engine_tokens(self, name: str, image: Image.Image, through_stop: bool) -> list[int]:
        """Greedy reply tokens. `through_stop`: exactly `n` tokens, stop tokens included as ordinary
        tokens (the timed rule); else the reply up to its first stop token, which is left out."""
        from seechat.infer.sampling import SamplingParams

        params = SamplingParams(max_new_tokens=self.n)
        return (
            self.engines[name]
            .generate(self.ids, [image], params, cache_prefix=False, ignore_eos=through_stop)
            .token_ids
        )

    # ---------------------------------------------------------------- transformers LLaVA

    def hf_run(self, concurrency: int) -> dict:
        from transformers.generation.streamers import BaseStreamer

        from seechat.data.collate import collate
        from seechat.data.processor import Encoded

        images = self._images(concurrency)
        t0 = time.perf_counter()  # the image processor is part of a transformers user's time to first token
        pixels = self.processor.preprocess_images(images)
        batch = collate(
            [Encoded(self.ids, None, None)] * concurrency, self.processor.tokenizer.pad_token_id, "left"
        )

        class Clock(BaseStreamer):
            def __init__(self):
                self.times: list[float] = []

            def put(self, value):
                self.times.append(time.perf_counter())

            def end(self):
                pass

        clock = Clock()
        with torch.inference_mode():
            out = self.llava.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=pixels,
                max_new_tokens=self.n,
                do_sample=False,
                streamer=clock if concurrency == 1 else None,
                pad_token_id=self.processor.tokenizer.pad_token_id,
            )
        t1 = time.perf_counter()
        tokens = (out.shape[1] - batch["input_ids"].shape[1]) * concurrency
        res = {"agg_tok_s": tokens / (t1 - t0), "tokens": tokens}
        if concurrency == 1:
            gen = clock.times[1:]  # the first put is the prompt
            res.update(ttft_s=gen[0] - t0, decode_tok_s=(len(gen) - 1) / (gen[-1] - gen[0]))
        return res

    def hf_tokens(self, image: Image.Image, through_stop: bool) -> list[int]:
        """`engine_tokens` for transformers: no eos_token_id (the stop token is an ordinary token), or
        the processor's stop tokens as eos_token_id (the reply is cut before the first one)."""
        pixels = self.processor.preprocess_images([image])
        stop = {} if through_stop else {"eos_token_id": self.stop_ids}
        with torch.inference_mode():
            out = self.llava.generate(
                input_ids=self.ids[None],
                pixel_values=pixels,
                max_new_tokens=self.n,
                do_sample=False,
                pad_token_id=self.processor.tokenizer.pad_token_id,
                **stop,
            )
        tokens = out[0, self.ids.numel() :].tolist()
        if not through_stop:
            cut = [i for i, t in enumerate(tokens) if t in self.stop_ids]
            tokens = tokens[: cut[0]] if cut else tokens
        return tokens


def greedy_agreement(bench: Bench, images: list[Image.Image]) -> dict[str, dict[str, bool]]:
    """Per engine: does its greedy reply equal transformers' under the timed rule ("through_stop":
    exactly n tokens, stop tokens ordinary) and under the serving rule ("stop": cut at the first
    stop token)? Both sides decode under the same rule in each, so on trained weights — where
    `<|im_end|>` does come — a False means a real difference."""
    rules = {"through_stop": True, "stop": False}
    reference = {rule: [bench.hf_tokens(im, through) for im in images] for rule, through in rules.items()}
    return {
        name: {
            rule: [bench.engine_tokens(name, im, through) for im in images] == reference[rule]
            for rule, through in rules.items()
        }
        for name in bench.engines
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/mini/stage2", help="an mlp2x_gelu seechat checkpoint")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is reported")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())

    from transformers.utils import logging as hf_logging

    from seechat.model.export import export_llava_hf

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tmp = Path(tempfile.mkdtemp(prefix="seechat-bench-"))
    ckpt = Path(args.model)
    built = not (ckpt / "config.json").is_file()
    if built:
        print(f"{ckpt} not found: building an untrained mini-size mlp2x_gelu model in {tmp}", flush=True)
        ckpt = build_mini_size_model(tmp)
    export_llava_hf(ckpt, tmp / "llava")
    bench = Bench(ckpt, tmp / "llava", args.new_tokens, max(args.concurrency))

    agree = greedy_agreement(bench, random_images(3, bench.image_size, 12345))
    print(f"greedy outputs equal transformers' ({args.new_tokens} tokens): {agree}", flush=True)
    for name in bench.engines:  # warm-up
        bench.engine_run(name, 1)
    bench.hf_run(1)

    names = [*bench.engines, "transformers"]
    runs: dict[str, dict[int, list[dict]]] = {name: {} for name in names}
    for _ in range(args.repeats):
        for c in args.concurrency:
            for name in names:
                res = bench.hf_run(c) if name == "transformers" else bench.engine_run(name, c)
                runs[name].setdefault(c, []).append(res)
            print(
                f"  c={c}: " + ", ".join(f"{n} {runs[n][c][-1]['agg_tok_s']:.1f}" for n in names) + " tok/s",
                flush=True,
            )
    spec = bench.engines["seechat"].counters
    accept = spec["accepted_drafts"] / max(1, spec["draft_tokens"])
    from_replies = spec["history_drafts"] / max(1, spec["draft_tokens"])
    for engine in bench.engines.values():
        engine.close()

    def med(name: str, c: int, key: str) -> float:
        return statistics.median(r[key] for r in runs[name][c])

    table = {
        name: {
            "ttft_ms": 1000 * med(name, 1, "ttft_s") if 1 in args.concurrency else None,
            "decode_tok_s_b1": med(name, 1, "decode_tok_s") if 1 in args.concurrency else None,
            "agg_tok_s": {c: med(name, c, "agg_tok_s") for c in args.concurrency},
        }
        for name in runs
    }
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"\nmachine: {machine}; load average before: {load_before}; model: "
        f"{'untrained mini-size (built)' if built else args.model}; decode path: "
        f"{bench.engines['seechat'].runner.decode_path}; {args.new_tokens} new tokens; "
        f"median of {args.repeats}; "
        f"n-gram drafts accepted: {accept:.0%} ({from_replies:.0%} of them drafted from earlier replies)"
    )
    print(
        "| | TTFT ms | decode tok/s (b=1) | "
        + " | ".join(f"agg tok/s c={c}" for c in args.concurrency)
        + " |"
    )
    print("|---|---|---|" + "---|" * len(args.concurrency))
    for name, row in table.items():
        print(
            f"| {name} | {row['ttft_ms']:.1f} | {row['decode_tok_s_b1']:.1f} | "
            + " | ".join(f"{row['agg_tok_s'][c]:.1f}" for c in args.concurrency)
            + " |"
        )
    h = table["transformers"]
    for name in bench.engines:
        s, c = table[name], max(args.concurrency)
        print(
            f"{name}: decode speed-up at batch 1 {s['decode_tok_s_b1'] / h['decode_tok_s_b1']:.2f}x, "
            f"aggregate at c={c} {s['agg_tok_s'][c] / h['agg_tok_s'][c]:.2f}x"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": machine,
                    "command": " ".join(sys.argv),
                    "table": table,
                    "greedy_agree": agree,
                    "draft_acceptance": accept,
                    "drafts_from_earlier_replies": from_replies,
                    "counters": spec,
                    "load_average_before": load_before,
                    "load_average_after": " ".join(f"{x:.1f}" for x in os.getloadavg()),
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
