"""Data-loading benchmark: seechat's streaming shard reader vs a naive one-file-per-sample dataset.

Both sides do the same work per sample — read, decode the JPEG, resize/crop/normalise with the
vision encoder's image processor, render the one-turn conversation with the chat template,
tokenise, label, collate into padded batches of `--batch-size` — through a torch DataLoader:

- **stream**: the stage-1 path itself, `seechat.train.data.pair_batches` (`PairShardDataset` over
  tar shards: sequential reads, shard split across workers, shuffle buffer, corrupt-skip checks);
- **naive**: a map-style dataset over the same pairs stored as one JPEG file per sample plus a
  caption list, shuffled by the DataLoader, `PIL.Image.open` per item, the same `PairToEncoded`
  transform and the same collate function.

Two settings, each run with `--workers` DataLoader workers (0 = everything in the main process):

- *mini world*: the mini world's 64 px JPEGs with the mini 64 px processor (what `make demo` runs);
- *336-px proxy*: the same scenes upscaled to 448 × 448 JPEG (q90) with a Chinese-CLIP ViT-L/14-336
  image processor (shorter side 336, centre crop 336): the per-image cost of the reference recipe
  (`configs/reference/stage1_qformer_qwen2.5-7b.yaml`), used for the loader-cores-per-GPU estimate.

Two rates per cell. Wall clock, steady state: images after the first batch / time after it
(worker start-up and the shuffle-buffer fill excluded); "per worker core" divides it by
max(1, workers). And images per CPU-second: all images / CPU time of the main process and its
DataLoader workers, which a shared, oversubscribed machine distorts least — it is the number the
loader-cores-per-GPU estimate uses. Both sides read from the page cache (the inputs were just
written). The script then prints the on-paper GPU consumption rate of the reference stage 1 on
one H100 and the loader cores it needs. Text uses the mini character tokenizer (no Qwen \
tokenizer offline); tokenising
is a small share of the per-sample cost either way.

    python benchmarks/bench_loader.py [--world runs/mini/world] [--workers 0 1 2] \
[--append benchmarks/RESULTS.md]

A missing world is built first (a small one: `--build-train` scenes), which is not timed.
"""

from __future__ import annotations

import argparse
import datetime
import io
import math
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from transformers import ChineseCLIPImageProcessor  # noqa: E402

from seechat.config import DataConfig, load_config  # noqa: E402
from seechat.data.char_tokenizer import build_char_tokenizer  # noqa: E402
from seechat.data.pairs import check_sample, expand_shards, iter_tar_samples  # noqa: E402
from seechat.data.processor import SeeChatProcessor  # noqa: E402
from seechat.data.shards import ShardWriter, encode_image  # noqa: E402
from seechat.train.data import PairToEncoded, StreamSpec, collate_skipping, pair_batches  # noqa: E402

REFERENCE = Path("configs/reference/stage1_qformer_qwen2.5-7b.yaml")
INSTRUCTIONS = ("<image>\n请用一句话描述这张图片。", "<image>\n简要描述图片内容。")


@dataclass(frozen=True)
class Setting:
    name: str
    source_side: int | None  # re-encode images at this square size; None = the world's bytes as they are
    crop: int  # image processor: shorter side and centre crop
    num_image_tokens: int  # the bridge's output length (64 mini mlp2x_gelu patches, 32 Q-Former queries)
    samples: int


# -- inputs --------------------------------------------------------------------------------------------


def ensure_world(world: Path, n_train: int) -> None:
    if list(world.glob("pairs/train/*.tar")):
        return
    from seechat.mini.world import WorldConfig, build_world

    print(f"no shards under {world}/pairs/train: building a mini world with {n_train} train scenes …")
    build_world(world, WorldConfig(n_train=n_train, n_val=20, n_test=20), progress=False)


def prepare(setting: Setting, world: Path, root: Path) -> tuple[str, Path, list[dict[str, str]]]:
    """The same `setting.samples` pairs twice: as 4 tar shards and as files + a caption list."""
    shards_dir, files_dir = root / "shards", root / "files"
    files_dir.mkdir(parents=True)
    rows: list[dict[str, str]] = []
    per_shard = math.ceil(setting.samples / 4)  # >= 2 shards per worker at 2 workers
    with ShardWriter(shards_dir, max_samples_per_shard=per_shard) as writer:
        for shard in expand_shards(str(world / "pairs" / "train" / "*.tar")):
            for key, members in iter_tar_samples(shard):
                sample = check_sample(key, members, "txt")
                data = sample.image_bytes
                if setting.source_side is not None:
                    with Image.open(io.BytesIO(data)) as image:
                        big = image.convert("RGB").resize(
                            (setting.source_side,) * 2, Image.Resampling.BICUBIC
                        )
                    data = encode_image(big, quality=90)
                writer.write(key, data, sample.text, {})
                (files_dir / f"{key}.jpg").write_bytes(data)
                rows.append({"key": key, "image": f"{key}.jpg", "caption": sample.text})
                if len(rows) == setting.samples:
                    return str(shards_dir / "*.tar"), files_dir, rows
    raise SystemExit(f"the world has only {len(rows)} train pairs; lower the sample counts")


def make_processor(setting: Setting, captions: list[str]) -> SeeChatProcessor:
    tokenizer = build_char_tokenizer(captions + list(INSTRUCTIONS))
    side = setting.crop
    image_processor = ChineseCLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )
    return SeeChatProcessor(tokenizer, image_processor, setting.num_image_tokens, max_length=256)


class FilePairs(Dataset):
    """The naive baseline: one JPEG file per sample, captions in a list, opened with PIL per item."""

    def __init__(self, root: Path, rows: list[dict[str, str]], transform: Callable[[dict], object]) -> None:
        self.root, self.rows, self.transform = root, rows, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> object:
        row = self.rows[i]
        with Image.open(self.root / row["image"]) as image:
            rgb = image.convert("RGB")
        return self.transform({"key": row["key"], "image": rgb, "text": row["caption"]})


# -- timing -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    img_s: float  # wall clock, steady state: images after the first batch / time after it
    img_per_cpu_s: float  # all images / CPU seconds of this process and its DataLoader workers


def cpu_seconds() -> float:
    """CPU time of this process plus its finished (joined) child processes."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def measure(batches: Iterator[dict]) -> Timing:
    """Run a loader to the end. Wall-clock rate excludes the first batch (worker start-up, the
    shuffle-buffer fill); the CPU rate counts everything, workers included (they are joined when
    the loader is exhausted), and is what a shared, oversubscribed machine measures most reliably."""
    cpu0 = cpu_seconds()
    first = int(next(batches)["input_ids"].shape[0])
    start, n = time.perf_counter(), 0
    for batch in batches:
        n += int(batch["input_ids"].shape[0])
    wall = time.perf_counter() - start
    return Timing(n / wall, (first + n) / (cpu_seconds() - cpu0))


def stream_batches(processor: SeeChatProcessor, shards: str, workers: int, batch_size: int) -> Iterator[dict]:
    cfg = DataConfig(
        kind="pairs",
        paths=(shards,),
        text_field="txt",
        pair_instructions=INSTRUCTIONS,
        shuffle_buffer=256,
        num_workers=workers,
    )
    return pair_batches(processor, StreamSpec(batch_size, seed=0, rank=0, world_size=1), cfg, 0, 0, None)


def naive_batches(
    processor: SeeChatProcessor, files: Path, rows: list[dict[str, str]], workers: int, batch_size: int
) -> Iterator[dict]:
    dataset = FilePairs(files, rows, PairToEncoded(processor, INSTRUCTIONS))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        collate_fn=partial(collate_skipping, processor.tokenizer.pad_token_id),
        generator=torch.Generator().manual_seed(0),
    )
    return iter(loader)


# -- the GPU side, on paper ------------------------------------------------------------------------------

H100_BF16_DENSE = 989e12  # FLOP/s, H100 SXM, dense bf16 tensor cores
VIT_L14_336 = {"params": 303e6, "layers": 24, "width": 1024, "tokens": 577}  # 24x24 patches + CLS
QWEN25_7B = {"params_matmul": 7.07e9}  # 6.53e9 non-embedding + 0.545e9 untied lm_head (3584 x 152064)


def gpu_images_per_second(tokens: int, mfu: float) -> tuple[float, float]:
    """(FLOP per image, images/s on one H100) for the reference stage 1.

    ViT frozen, forward only: 2 · P_vit · N + 4 · L · N² · d (attention scores and mixing).
    LM frozen, forward + backward to its inputs only (no weight gradients, no recomputation):
    backward ≈ forward, so 4 · P_lm · T; attention at T ≈ 100 adds < 1 % and is left out.
    The Q-Former (32 queries, 2 layers, the only trained part) costs < 1 %: left out.
    """
    v = VIT_L14_336
    vit = 2 * v["params"] * v["tokens"] + 4 * v["layers"] * v["tokens"] ** 2 * v["width"]
    lm = 4 * QWEN25_7B["params_matmul"] * tokens
    flop = vit + lm
    return flop, mfu * H100_BF16_DENSE / flop


# -- main -------------------------------------------------------------------------------------------------


def machine() -> str:
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return (
        f"{os.cpu_count()}-core {platform.processor() or platform.machine()} ({platform.system()}), "
        f"python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"load average {load:.1f} at start"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--world", type=Path, default=Path("runs/mini/world"), help="mini world (built if missing)"
    )
    parser.add_argument("--build-train", type=int, default=2000, help="train scenes when building a world")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader workers to try")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per batch (default: 32)")
    parser.add_argument("--mini-samples", type=int, default=1600, help="pairs in the mini-world setting")
    parser.add_argument("--proxy-samples", type=int, default=320, help="pairs in the 336-px proxy setting")
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell; the median is reported")
    parser.add_argument("--mfu", type=float, default=0.40, help="model FLOP utilisation for the GPU estimate")
    parser.add_argument(
        "--append", type=Path, default=None, help="append the results as markdown to this file"
    )
    args = parser.parse_args(argv)

    started = time.time()
    info = machine()
    ensure_world(args.world, args.build_train)
    settings = (
        Setting("mini world: 64 px JPEG -> 64 px", None, 64, 64, args.mini_samples),
        Setting("336-px proxy: 448 px JPEG -> 336 px", 448, 336, 32, args.proxy_samples),
    )
    results: list[dict] = []
    backends: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        for i, setting in enumerate(settings):
            shards, files, rows = prepare(setting, args.world, Path(tmp) / str(i))
            processor = make_processor(setting, [r["caption"] for r in rows])
            backends.append(f"{setting.name.split(':')[0]}: {type(processor.image_processor).__name__}")
            for workers in args.workers:
                timings: dict[str, list[Timing]] = {"stream": [], "naive": []}
                for _ in range(args.repeats):  # interleaved so that machine noise hits both alike
                    timings["stream"].append(
                        measure(stream_batches(processor, shards, workers, args.batch_size))
                    )
                    timings["naive"].append(
                        measure(naive_batches(processor, files, rows, workers, args.batch_size))
                    )
                for reader, values in timings.items():
                    rate = statistics.median(t.img_s for t in values)
                    per_cpu = statistics.median(t.img_per_cpu_s for t in values)
                    results.append(
                        {
                            "setting": setting.name,
                            "reader": reader,
                            "workers": workers,
                            "samples": setting.samples,
                            "img_s": rate,
                            "per_core": rate / max(1, workers),
                            "per_cpu_s": per_cpu,
                        }
                    )
                    print(
                        f"{setting.name:<38} {reader:<6} workers={workers}  {rate:8.1f} img/s  "
                        f"{per_cpu:8.1f} img/CPU-s",
                        flush=True,
                    )

    cfg = load_config(REFERENCE)
    info += "; image processors: " + ", ".join(backends)
    lines = report(results, cfg, args, info, time.time() - started)
    print("\n" + "\n".join(lines))
    if args.append is not None:
        with args.append.open("a", encoding="utf-8") as f:
            f.write("\n" + "\n".join(lines) + "\n")
    return 0


def report(results: list[dict], cfg, args: argparse.Namespace, info: str, seconds: float) -> list[str]:
    command = "python benchmarks/bench_loader.py " + shlex.join(sys.argv[1:])
    out = [
        f"### Run of {datetime.date.today().isoformat()}",
        "",
        f"Command: `{command.strip()}` ({seconds:.0f} s in all). Machine: {info}.",
        "",
        (
            "| setting | reader | workers | samples | img/s (wall) | img/s per worker core (wall) | "
            "img per CPU-second |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        out.append(
            f"| {r['setting']} | {r['reader']} | {r['workers']} | {r['samples']} | "
            f"{r['img_s']:.0f} | {r['per_core']:.0f} | {r['per_cpu_s']:.0f} |"
        )
    ratios = []
    for r in results:
        if r["reader"] == "stream":
            naive = next(
                n
                for n in results
                if n["reader"] == "naive" and n["setting"] == r["setting"] and n["workers"] == r["workers"]
            )
            ratios.append(
                f"{r['setting'].split(':')[0]} w={r['workers']}: {r['img_s'] / naive['img_s']:.2f}x"
            )
    out += ["", "stream / naive: " + ", ".join(ratios) + "."]

    q = cfg.model.bridge.num_queries
    lo_tokens, hi_tokens = 96, 160
    flop_lo, gpu_hi = gpu_images_per_second(lo_tokens, args.mfu)
    flop_hi, gpu_lo = gpu_images_per_second(hi_tokens, args.mfu)
    proxy = [r["per_cpu_s"] for r in results if r["reader"] == "stream" and r["setting"].startswith("336")]
    per_core = statistics.median(proxy) if proxy else float("nan")  # a busy core's rate, robust to sharing
    out += [
        "",
        f"GPU side, on paper ({REFERENCE}: {q} Q-Former queries, batch {cfg.train.batch_size}/GPU, "
        f"max_length {cfg.model.max_length}, bf16, "
        f"gradient_checkpointing={cfg.train.gradient_checkpointing}, "
        f"num_workers {cfg.data.num_workers}): FLOP/image = ViT-L/14-336 forward "
        f"(2·0.303e9·577 + 4·24·577²·1024 = 3.8e11) + Qwen2.5-7B forward and activation-only backward "
        f"(4·7.07e9·T); T = {lo_tokens}–{hi_tokens} LM tokens ({q} image tokens + template/system prompt + "
        f"instruction + caption, + padding to the batch's longest) -> {flop_lo:.2e}–{flop_hi:.2e} FLOP. "
        f"One H100 (989 TFLOP/s dense bf16) at {args.mfu:.0%} MFU consumes "
        f"**{gpu_lo:.0f}–{gpu_hi:.0f} images/s**.",
        f"Streaming loader at the 336-px proxy: {per_core:.0f} images per CPU-second (median over worker "
        f"counts) -> "
        f"**{gpu_lo / per_core:.1f}–{gpu_hi / per_core:.1f} loader cores per GPU** at full speed "
        f"(the recipe's num_workers={cfg.data.num_workers} leaves "
        f"{cfg.data.num_workers / (gpu_hi / per_core):.1f}× headroom "
        "over the upper figure).",
    ]
    return out


if __name__ == "__main__":
    sys.exit(main())
