"""GPU serving benchmark at real size: seechat's engine vs transformers' LlavaForConditionalGeneration.

One command, one process, the same weights on both sides: the reference architecture
(configs/reference/stage2_mlp_qwen2.5-7b.yaml: Chinese-CLIP ViT-L/14 @ 336 px, the mlp2x_gelu
bridge, a Qwen2.5-7B-shaped LM; shapes from `seechat.model.sizes`, nothing downloaded) built with
random weights straight on the device in bf16 (speed does not depend on weight values), and a
`LlavaForConditionalGeneration` built on the meta device whose parts *are* the seechat model's
modules (no second copy). Every request carries its own random image (the image cache never
helps), the prefix cache is off, decoding is greedy with stop tokens ordinary tokens on both sides
(`ignore_eos` / no `eos_token_id`), exactly `--new-tokens` tokens per request. Measured:

- TTFT for an image + question at batch 1 (image preprocessing, vision tower, prefill, first token);
- decode tok/s at batch 1 (tokens after the first / time after the first);
- aggregate tok/s with 8 and 32 concurrent requests (transformers: one `generate` batch);
- peak GPU memory allocated while each side ran (weights included: ~15.2 GB; each engine is
  closed after its row, so no row holds another engine's KV slot pool or CUDA graphs);
- the device-to-device copy bandwidth, measured in the same run (bytes read + written / s), and the
  bandwidth limit of batch-1 decode it implies: bandwidth / the bytes of LM weights one decode step
  reads (every LM matrix except the input embedding, of which one row is read).

Engine rows:
- `seechat`: static decode (slotted KV + CUDA graphs, `EngineConfig.static_decode`, the default
  on CUDA), adaptive speculation on;
- with `--generic`, `seechat, no static decode`: the engine's generic path (35 tok/s at batch 1
  on an H200, in RESULTS.md);
- with `--compile`, `seechat, compiled static step`: the static step's layers through
  torch.compile inside the CUDA graphs (`EngineConfig.compile_decode`; not the default until
  measured here);
- with `--whole-slot`, `seechat, attention over the whole slot`: the static step reading every
  column of its KV slot, as before column buckets.

The engines get the default KV slot (`max_model_len` 0: the LM's limit, at most 4096 tokens)
unless `--max-len` says otherwise, so the rows are what a user gets. Also reported: how many
leading greedy tokens each engine shares with transformers on probe images (bf16 kernels differ,
so random weights may part after a while; the CPU rehearsal in fp32 must agree fully).

Rows run one after another, each warmed up, checked, timed and printed before the next starts: the
default engine first, transformers second, then the optional ones. A row that fails (a compile
error, out of memory) prints its error and the others still run; `--json` is rewritten after every
row, so a device run cut short by its time limit keeps what it measured. The exit status is 1 when
a row failed.

    python benchmarks/bench_gpu_serving.py --json out.json     # on a GPU (~3-4 min on an H100)
    python benchmarks/bench_gpu_serving.py --tiny              # CPU rehearsal with tiny shapes
    python benchmarks/bench_gpu_serving.py --layers 1 --new-tokens 4 --concurrency 1 2 --repeats 1 \
        --profile --compile --whole-slot
        # CPU rehearsal at full width (3.3 min on 2 cores): the reference's widths, heads,
        # 152,064-token vocabulary, 336-px images and 4096-token slot in bf16, one layer per tower

The two rehearsals catch different things: `--tiny` runs every row in seconds and must agree with
transformers token for token (fp32); `--layers` runs the real shapes, so what depends on them (the
tokenizer covering every LM id, 576 image tokens, GQA with 7 query heads per KV head, the column
buckets of the default slot, bf16) fails on the CPU and not in scarce device time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from seechat.config import BridgeConfig, LMConfig, ModelConfig, VisionConfig, load_config  # noqa: E402
from seechat.infer.chat import prompt_ids  # noqa: E402
from seechat.infer.engine import Engine, EngineConfig  # noqa: E402
from seechat.infer.sampling import SamplingParams  # noqa: E402
from seechat.model.build import assemble  # noqa: E402
from seechat.model.export import llava_view  # noqa: E402
from seechat.model.sizes import expert_config, with_layers  # noqa: E402

REFERENCE_RECIPE = ROOT / "configs" / "reference" / "stage2_mlp_qwen2.5-7b.yaml"
QUESTION = "请详细描述这张图片里的物体、颜色和位置。"
GENERIC = "seechat, no static decode"
COMPILED = "seechat, compiled static step"
WHOLE_SLOT = "seechat, attention over the whole slot"


def reference_configs(layers: int = 0):
    """The reference's (vision, LM) transformers configs; with `layers`, the same widths, heads,
    vocabulary and image size with that many layers in each tower (the full-width rehearsal)."""
    ref = load_config(REFERENCE_RECIPE).model
    vision_cfg, lm_cfg = expert_config(ref.vision.path), expert_config(ref.lm.path)
    return (with_layers(vision_cfg, layers), with_layers(lm_cfg, layers)) if layers else (vision_cfg, lm_cfg)


def build(tiny: bool, device: torch.device, dtype: torch.dtype, layers: int = 0):
    """(seechat model, processor, LLaVA model sharing its modules), random weights on `device`;
    `layers` > 0 keeps the reference's shapes with that many layers per tower."""
    from transformers import (
        AutoModelForCausalLM,
        ChineseCLIPVisionConfig,
        ChineseCLIPVisionModel,
        CLIPImageProcessor,
        Qwen2Config,
    )

    from seechat.data.char_tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer([QUESTION])
    if tiny:
        vision_cfg = ChineseCLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=56,
            patch_size=14,
            projection_dim=32,
        )
        lm_cfg = Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tokenizer) + 8,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        )
    else:
        vision_cfg, lm_cfg = reference_configs(layers)
        # one character per LM token id, so every token a random LM samples streams as text
        fillers = filler_chars(lm_cfg.vocab_size - len(tokenizer))
        tokenizer = build_char_tokenizer([QUESTION], extra_chars=fillers)
    size = vision_cfg.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    cfg = ModelConfig(
        vision=VisionConfig(feature_layer=-2, select="patch"),
        lm=LMConfig(),
        bridge=BridgeConfig(type="mlp2x_gelu"),
        dtype={torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype],
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise straight in bf16: the 7B model never exists in fp32
    try:
        with torch.device(device):
            vision = ChineseCLIPVisionModel(vision_cfg)
            lm = AutoModelForCausalLM.from_config(lm_cfg, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(default)
    model, processor = assemble(cfg, vision.eval(), lm.eval(), tokenizer, image_processor)
    model = model.to(device).eval().requires_grad_(False)

    llava = llava_view(model, processor.stop_token_ids, tokenizer.pad_token_id)
    llava.eval().generation_config.eos_token_id = None  # stop tokens are ordinary tokens (see docstring)
    return model, processor, llava


def filler_chars(n: int) -> list[str]:
    """`n` distinct characters outside ASCII and the question (CJK and beyond, no surrogates)."""
    taken, out, cp = set(QUESTION), [], 0x4E00
    while len(out) < n:
        if not 0xD800 <= cp <= 0xDFFF and chr(cp) not in taken:
            out.append(chr(cp))
        cp += 1
    return out


def random_images(n: int, size: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, iters: int = 20) -> float | None:
    """Device-to-device copy rate, bytes read + written per second; None off CUDA."""
    if device.type != "cuda":
        return None
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        b.copy_(a)
    end.record()
    end.synchronize()
    rate = 2 * nbytes * iters / (start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return rate


def decode_weight_bytes(lm: torch.nn.Module) -> int:
    """Bytes of LM weights one decode step reads: all but the input embedding (one row of it)."""
    embed = lm.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in lm.parameters() if p is not embed)


class GpuBench:
    def __init__(
        self,
        model,
        processor,
        llava,
        new_tokens: int,
        max_batch: int,
        max_len: int,
        compiled: bool = False,
        whole_slot: bool = False,
        generic: bool = False,
    ):
        self.model, self.processor, self.llava = model, processor, llava
        self.device = model.device
        self.n = new_tokens
        common = dict(max_batch_size=max_batch, max_model_len=max_len, prefix_cache_mb=0)
        self.engines = {"seechat": Engine(model, processor, EngineConfig(static_decode="on", **common))}
        if generic:
            self.engines[GENERIC] = Engine(model, processor, EngineConfig(static_decode="off", **common))
        if compiled:
            self.engines[COMPILED] = Engine(
                model, processor, EngineConfig(static_decode="on", compile_decode=True, **common)
            )
        if whole_slot:
            engine = Engine(model, processor, EngineConfig(static_decode="on", **common))
            engine.runner.static.min_columns = engine.runner.capacity  # one column bucket: the slot
            self.engines[WHOLE_SLOT] = engine
        self.ids = prompt_ids(processor, [{"role": "user", "content": "<image>\n" + QUESTION}], 1)
        self.image_size = model.vision_tower.image_size
        self.seed = 0
        self._reference: dict[tuple[bytes, int], list[int]] = {}  # transformers' greedy tokens per probe

    def close(self) -> None:
        for e in self.engines.values():
            e.close()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _images(self, n: int) -> list[Image.Image]:
        self.seed += 1
        return random_images(n, self.image_size, self.seed)

    def engine_run(self, name: str, concurrency: int) -> dict:
        images = self._images(concurrency)
        params = SamplingParams(max_new_tokens=self.n)
        stamps: list[list[tuple[float, int]]] = [[] for _ in range(concurrency)]
        left = [concurrency]
        errors: list[str] = []
        done = threading.Event()

        def sink(i):
            def put(ev):
                stamps[i].append((time.perf_counter(), len(ev.token_ids)))
                if ev.finish_reason == "error":
                    errors.append(str(ev.error))
                if ev.finish_reason is not None:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()

            return put

        self._sync()
        t0 = time.perf_counter()
        for i in range(concurrency):
            self.engines[name].submit(
                self.ids, [images[i]], params, sink=sink(i), cache_prefix=False, ignore_eos=True
            )
        done.wait()
        t1 = time.perf_counter()
        if errors:
            raise RuntimeError(f"{name}: a request failed: {errors[0]}")
        tokens = sum(n for s in stamps for _, n in s)
        first, last = stamps[0][0][0], stamps[0][-1][0]
        return {
            "ttft_s": first - t0,
            "decode_tok_s": (self.n - 1) / (last - first),
            "agg_tok_s": tokens / (t1 - t0),
            "tokens": tokens,
        }

    def hf_run(self, concurrency: int) -> dict:
        from transformers.generation.streamers import BaseStreamer

        images = self._images(concurrency)

        class Clock(BaseStreamer):
            def __init__(self):
                self.times: list[float] = []

            def put(self, value):
                self.times.append(time.perf_counter())

            def end(self):
                pass

        clock = Clock()
        self._sync()
        t0 = time.perf_counter()  # preprocessing is part of a transformers user's time to first token
        pixels = self.processor.preprocess_images(images).to(self.device, self.model.vision_tower.dtype)
        ids = self.ids[None].expand(concurrency, -1).to(self.device)
        with torch.inference_mode():
            out = self.llava.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=pixels,
                max_new_tokens=self.n,
                do_sample=False,
                streamer=clock if concurrency == 1 else None,
            )
        self._sync()
        t1 = time.perf_counter()
        tokens = (out.shape[1] - ids.shape[1]) * concurrency
        res = {"agg_tok_s": tokens / (t1 - t0), "tokens": tokens}
        if concurrency == 1:
            gen = clock.times[1:]  # the first put is the prompt
            res.update(ttft_s=gen[0] - t0, decode_tok_s=(len(gen) - 1) / (gen[-1] - gen[0]))
        return res

    def agreement(self, name: str, images: list[Image.Image]) -> list[int]:
        """Per probe image: how many leading greedy tokens engine `name` shares with transformers."""
        params = SamplingParams(max_new_tokens=self.n)
        out = []
        for image in images:
            key = (image.tobytes(), self.n)
            if key not in self._reference:
                pixels = self.processor.preprocess_images([image]).to(
                    self.device, self.model.vision_tower.dtype
                )
                with torch.inference_mode():
                    self._reference[key] = self.llava.generate(
                        input_ids=self.ids[None].to(self.device),
                        pixel_values=pixels,
                        max_new_tokens=self.n,
                        do_sample=False,
                    )[0, self.ids.numel() :].tolist()
            ref = self._reference[key]
            got = self.engines[name].generate(self.ids, [image], params, cache_prefix=False, ignore_eos=True)
            pairs = zip(got.token_ids, ref, strict=True)
            out.append(next((i for i, (a, b) in enumerate(pairs) if a != b), len(ref)))
        return out


def profile_decode(bench: GpuBench, name: str = "seechat", top: int = 15) -> dict:
    """One batch-1 request of engine `name` under the torch profiler: the kernels that took the
    device's time (on a CPU rehearsal: the ops that took the CPU's), and how busy the device was
    over the request (kernel time / wall time: well under 1 means the step waits on the host or
    on launches, not on the kernels), and how many kernels ran per generated token (prefill
    included; a batch-1 decode step's count, ~20 per layer, checks what the CPU test of the
    static step counts). CUDA kernels are traced from every thread; on a CPU the profiler sees
    only this thread's ops, not the engine thread's, so the rehearsal checks the plumbing, not the
    numbers."""
    from torch.profiler import ProfilerActivity, profile

    cuda = bench.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        res = bench.engine_run(name, 1)
        wall = time.perf_counter() - t0
    field = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = busy_rows(prof.key_averages(), cuda)
    busy = sum(r[2] for r in rows)
    launches = sum(r[1] for r in rows)
    return {
        "engine": name,
        "wall_s": wall,
        "tokens": res["tokens"],
        "time_field": field,
        "busy_s": busy,
        "busy_share": busy / wall,
        "launches": launches,
        "launches_per_token": launches / res["tokens"],
        "top": [{"name": k, "calls": c, "seconds": t, "share": t / busy} for k, c, t in rows[:top]],
    }


def busy_rows(averages, cuda: bool) -> list[tuple[str, int, float]]:
    """(name, calls, seconds) of what kept the device busy, longest first: on CUDA the device's own
    activities (kernels, memcpys, memsets), on a CPU the ops' self time. On CUDA an op's row is not
    counted: torch credits the op that launched a kernel with that kernel's time as its
    `self_device_time_total` (`FunctionEvent.self_device_time_total`), beside the kernel's own row,
    so counting every row with device time counts such kernels twice."""
    from torch.autograd import DeviceType

    if cuda:
        device = (e for e in averages if e.device_type != DeviceType.CPU)
        timed = ((e.key, e.count, e.self_device_time_total) for e in device)
    else:
        timed = ((e.key, e.count, e.self_cpu_time_total) for e in averages)
    return sorted(((k, c, t / 1e6) for k, c, t in timed if t > 0), key=lambda r: -r[2])


def profile_report(prof: dict) -> str:
    lines = [
        f"profile of one batch-1 request ({prof['engine']}, {prof['tokens']} tokens): wall "
        f"{prof['wall_s'] * 1e3:.1f} ms, {prof['time_field']} {prof['busy_s'] * 1e3:.1f} ms "
        f"({prof['busy_share']:.0%} busy); {prof['launches']} kernels / ops "
        f"({prof['launches_per_token']:.0f} per generated token, prefill included)",
        "| kernel / op | calls | ms | share |",
        "|---|---|---|---|",
    ]
    for r in prof["top"]:
        lines.append(f"| {r['name'][:90]} | {r['calls']} | {r['seconds'] * 1e3:.2f} | {r['share']:.1%} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    """Every row in turn, the default engine first and transformers second, then the optional
    engines: each warmed up (short requests: CUDA graphs captured, kernels chosen), checked against
    transformers' greedy tokens, timed, printed and written to `--json` as soon as it is done. A row
    that fails (a compile error, out of memory) is reported with its error and the others go on, so
    a device run cut short by its time limit or by one lever still gives every figure before it."""
    device = torch.device(args.device)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    t = time.perf_counter()
    model, processor, llava = build(args.tiny, device, dtype, args.layers)
    built_s = time.perf_counter() - t
    lm = model.language_model
    weight_bytes = decode_weight_bytes(lm)
    bandwidth = copy_bandwidth(device)
    bench = GpuBench(
        model,
        processor,
        llava,
        args.new_tokens,
        max(args.concurrency),
        args.max_len,
        args.compile,
        args.whole_slot,
        args.generic,
    )
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    res = {
        "card": card,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", *sys.argv]),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "model": "tiny (rehearsal)"
        if args.tiny
        else f"reference shapes, {args.layers} layer(s) per tower (rehearsal)"
        if args.layers
        else "reference: Chinese-CLIP ViT-L/14-336 + mlp2x_gelu + Qwen2.5-7B",
        "lm_params": sum(p.numel() for p in lm.parameters()),
        "decode_weight_bytes": weight_bytes,
        "copy_bandwidth_gb_s": None if bandwidth is None else bandwidth / 1e9,
        "bandwidth_limit_tok_s": None if bandwidth is None else bandwidth / weight_bytes,
        "build_s": built_s,
        "new_tokens": args.new_tokens,
        "prompt_tokens": int(bench.ids.numel()),
        "kv_slot_tokens": bench.engines["seechat"].runner.capacity,
        "repeats": args.repeats,
        "decode_paths": {},
        "greedy_tokens_shared": {},
        "draft_acceptance": None,
        "table": {},
        "errors": {},
        "profile": None,
        "profile_compiled": None,
    }
    probes = random_images(2, bench.image_size, 12345)
    try:
        for name in ["seechat", "transformers", *(n for n in bench.engines if n != "seechat")]:
            try:
                measure_row(bench, name, args, probes, res)
            except Exception as e:  # noqa: BLE001 - one row's failure must not lose the other rows
                res["errors"][name] = f"{type(e).__name__}: {e}"
                print(f"  {name}: FAILED, {res['errors'][name]}", flush=True)
            if name in bench.engines:  # done with: its KV pool and graphs go, the next rows get the memory
                bench.engines.pop(name).close()
            if device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
            if args.json:
                Path(args.json).write_text(json.dumps(res, indent=2))
    finally:
        bench.close()
    return res


def measure_row(bench: GpuBench, name: str, args: argparse.Namespace, probes: list, res: dict) -> None:
    """Warm up, check, time (and profile, with --profile) one row; its figures go into `res`."""
    engine = bench.engines.get(name)
    started = None
    if engine is not None:  # started here, so its warm-up (KV pool, CUDA graphs, compiling) is this row's
        t0 = time.perf_counter()
        engine.start()
        started = time.perf_counter() - t0
    bench.n = min(16, args.new_tokens)  # warm-up requests, short: kernels chosen, caches filled
    for c in args.concurrency:
        bench.hf_run(c) if engine is None else bench.engine_run(name, c)
    bench.n = args.new_tokens
    if engine is not None:
        res["greedy_tokens_shared"][name] = agree = bench.agreement(name, probes)
        print(f"  {name}: leading greedy tokens equal to transformers' (of {bench.n}): {agree}", flush=True)
    if bench.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    runs: dict[int, list[dict]] = {}
    for _ in range(args.repeats):
        for c in args.concurrency:
            runs.setdefault(c, []).append(bench.hf_run(c) if engine is None else bench.engine_run(name, c))
    peak = torch.cuda.max_memory_allocated() / 1e9 if bench.device.type == "cuda" else None

    def cell(c: int, key: str, scale: float = 1.0) -> dict:
        xs = [scale * r[key] for r in runs[c]]
        return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}

    res["table"][name] = row = {
        "ttft_ms": cell(1, "ttft_s", 1000.0),
        "decode_tok_s_b1": cell(1, "decode_tok_s"),
        "agg_tok_s": {c: cell(c, "agg_tok_s") for c in args.concurrency},
        "peak_memory_gb": peak,
        "start_s": started,  # the engine's start: its warm-up (None: transformers)
    }
    print(  # each row as it is done: a run cut short by a time limit still tells its figures
        f"  {name}: TTFT {row['ttft_ms']['median']:.1f} ms, "
        f"decode b=1 {row['decode_tok_s_b1']['median']:.1f} tok/s, aggregate "
        + ", ".join(f"c={c} {v['median']:.1f}" for c, v in row["agg_tok_s"].items())
        + " tok/s",
        flush=True,
    )
    if engine is None:
        return
    res["decode_paths"][name] = engine.runner.decode_path
    if name == "seechat":
        counters = engine.counters
        res["draft_acceptance"] = counters["accepted_drafts"] / max(1, counters["draft_tokens"])
    if args.profile and name in ("seechat", COMPILED):
        prof = profile_decode(bench, name)
        res["profile" if name == "seechat" else "profile_compiled"] = prof
        print(profile_report(prof).splitlines()[0], flush=True)  # the kernel table comes with the report


def report(res: dict) -> str:
    lines = [
        f"card: {res['card']}; torch {res['torch']}, transformers {res['transformers']}; {res['date']}",
        f"model: {res['model']} ({res['lm_params'] / 1e9:.2f} B LM parameters); "
        f"prompt {res['prompt_tokens']} tokens, {res['new_tokens']} new, KV slots of "
        f"{res.get('kv_slot_tokens')} tokens; "
        f"median (min-max) of {res['repeats']}; decode paths {res['decode_paths']}",
    ]
    limit = res["bandwidth_limit_tok_s"]
    if limit:
        lines.append(
            f"copy bandwidth {res['copy_bandwidth_gb_s']:.0f} GB/s (read + written); decode reads "
            f"{res['decode_weight_bytes'] / 1e9:.2f} GB of weights per step -> bandwidth limit "
            f"{limit:.1f} tok/s at batch 1"
        )
    table = res["table"]
    conc = list(next(iter(table.values()))["agg_tok_s"]) if table else []
    if table:
        lines.append(
            "| | TTFT ms | decode tok/s (b=1) | "
            + " | ".join(f"agg tok/s c={c}" for c in conc)
            + " | peak memory GB |"
        )
        lines.append("|---|---|---|" + "---|" * len(conc) + "---|")

    def fmt(c: dict) -> str:
        return f"{c['median']:.1f} ({c['min']:.1f}-{c['max']:.1f})"

    for name, row in table.items():
        mem = "-" if row["peak_memory_gb"] is None else f"{row['peak_memory_gb']:.1f}"
        lines.append(
            f"| {name} | {fmt(row['ttft_ms'])} | {fmt(row['decode_tok_s_b1'])} | "
            + " | ".join(fmt(row["agg_tok_s"][c]) for c in conc)
            + f" | {mem} |"
        )
    for name, error in res.get("errors", {}).items():
        lines.append(f"{name}: FAILED, {error}")
    if "seechat" in table and "transformers" in table:
        ours, hf = table["seechat"], table["transformers"]
        b1 = ours["decode_tok_s_b1"]["median"] / hf["decode_tok_s_b1"]["median"]
        agg = {c: ours["agg_tok_s"][c]["median"] / hf["agg_tok_s"][c]["median"] for c in conc}
        lines.append(
            f"seechat vs transformers: decode b=1 {b1:.2f}x, "
            + ", ".join(f"c={c} {x:.2f}x" for c, x in agg.items())
        )
    if limit:
        lines.append(
            "batch-1 decode as a share of the bandwidth limit: "
            + ", ".join(f"{n} {row['decode_tok_s_b1']['median'] / limit:.0%}" for n, row in table.items())
        )
    lines.append(f"leading greedy tokens shared with transformers: {res['greedy_tokens_shared']}")
    starts = {n: row["start_s"] for n, row in table.items() if row.get("start_s") is not None}
    if starts:
        lines.append(
            "engine start (warm-up: KV pool, CUDA graphs, compiling): "
            + ", ".join(f"{n} {t:.1f} s" for n, t in starts.items())
        )
    if res.get("profile"):
        lines.append(profile_report(res["profile"]))
    if res.get("profile_compiled"):
        lines.append(profile_report(res["profile_compiled"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes in fp32: a CPU rehearsal")
    parser.add_argument(
        "--layers",
        type=int,
        default=0,
        help="keep the reference's widths, vocabulary, image size and bf16 but build only this many layers "
        "per tower: a CPU rehearsal of the full-size shapes (default 0: every layer)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--max-len",
        type=int,
        default=0,
        help="the engines' max_model_len, the static KV slot's length (default 0: the engine's default, "
        "the LM's limit up to 4096 tokens)",
    )
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="then profile one batch-1 request of the default engine: top kernels and device busy share",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help=f"also time '{COMPILED}': the static step's layers through torch.compile "
        "(EngineConfig.compile_decode); with --profile, profile it too",
    )
    parser.add_argument(
        "--generic",
        action="store_true",
        help=f"also time '{GENERIC}': the engine's generic decode path (transformers' forward per step)",
    )
    parser.add_argument(
        "--whole-slot",
        action="store_true",
        help=f"also time '{WHOLE_SLOT}': the static step attending over every column of its KV slot "
        "(StaticDecoder.min_columns = the slot), the step before column buckets",
    )
    args = parser.parse_args(argv)
    if args.tiny and args.layers:
        parser.error("--tiny and --layers are two different rehearsals: pick one")
    if args.layers < 0:
        parser.error("--layers must be >= 1 (or 0: the whole reference)")
    if 1 not in args.concurrency:
        parser.error("--concurrency must include 1 (TTFT and batch-1 decode)")
    res = run(args)
    print(report(res), flush=True)
    return 1 if res["errors"] else 0  # the figures of the rows that ran are printed and written all the same


if __name__ == "__main__":
    sys.exit(main())
