"""Padding-free training batches (`train.padding_free`) vs padded ones, on a recipe's real data.

Takes the first `--batches` micro-batches a run of `RECIPE` would train on (its data, its batch size,
its length grouping, through seechat's own `BatchStream`), and times full training steps (forward,
backward, AdamW step; the loss-only forward training uses) of the recipe's model on the same samples
laid out three ways (four with `--peer`), alternating the layouts round by round:

- `padded`: the default collate, right-padded to each batch's longest sample, SDPA with the mask;
- `padding-free, transformers' mask`: the samples end to end in one row, the LM left on `sdpa`;
  transformers reads the restarting position ids and builds a block-diagonal (N, N) mask — what
  a user gets from transformers alone (TRL's `padding_free` / `DataCollatorWithFlattening` layout);
- `padding-free, seechat varlen`: the same row on seechat's varlen attention (seechat.model.varlen),
  what `train.padding_free=true` runs;
- with `--peer` (an mlp2x_gelu recipe, LLaVA's shape): `transformers LLaVA, plain loop`: the padded
  batches through transformers' `LlavaForConditionalGeneration` as a plain loop calls it (forward
  with `labels`: logits at every position, then the loss; backward; the same AdamW), built around
  the recipe's own modules (`seechat.model.export.llava_view`: the same weights, trainable
  parameters and optimizer) — what a user would train without seechat. Its loss is a token mean,
  so the first-batch check holds under `train.loss_average=token` (the default).

Reported per layout: step time (median and range over rounds), real tokens / s, the tokens computed
(real + padding), and the loss of the first batch before any step, which must agree across layouts.

    python benchmarks/bench_padding_free.py seechat/mini/recipes/stage2.yaml   # after `make demo`
    python benchmarks/bench_padding_free.py RECIPE key=value ... --batches 8 --rounds 5 --json out.json
    python benchmarks/bench_padding_free.py seechat/mini/recipes/stage2.yaml --peer   # vs transformers' LLaVA
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from seechat.config import RunConfig, load_config  # noqa: E402
from seechat.model.export import llava_inputs, llava_view  # noqa: E402
from seechat.model.varlen import use_varlen_attention  # noqa: E402
from seechat.train.data import BatchStream, StreamSpec, count_tokens  # noqa: E402
from seechat.train.loop import batch_loss, build_model, make_optimizer  # noqa: E402

LAYOUTS = ("padded", "padding-free, transformers' mask", "padding-free, seechat varlen")
PEER = "transformers LLaVA, plain loop"


def take_batches(cfg: RunConfig, processor, n: int, padding_free: bool) -> list[dict]:
    spec = StreamSpec(cfg.train.batch_size, cfg.train.seed, 0, 1)
    stream = BatchStream(cfg.data, processor, spec, cfg.train.group_by_length, padding_free=padding_free)
    return [next(stream) for _ in range(n)]


def layout_loss(model, batch: dict, average: str, llava=None) -> torch.Tensor:
    """seechat's training loss, or with `llava` (the peer) transformers' LLaVA as a plain loop calls
    it: `labels` in, logits at every position, mean loss."""
    if llava is None:
        return batch_loss(model, batch, average).loss
    return llava(**llava_inputs(llava, batch)).loss


def step(model, optimizer, batch: dict, average: str, llava=None) -> float:
    loss = layout_loss(model, batch, average, llava)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def set_layout(model, layout: str) -> None:
    lm = model.language_model
    if layout == LAYOUTS[2]:
        use_varlen_attention(lm)
    elif lm.config._attn_implementation != "sdpa":
        lm.set_attn_implementation("sdpa")


def first_loss(model, batch: dict, average: str, llava=None) -> float:
    with torch.no_grad():
        return float(layout_loss(model, batch, average, llava))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", help="a training recipe (YAML); its data, model, batch size and init_from")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides, as `seechat train` takes them")
    ap.add_argument("--batches", type=int, default=6, help="micro-batches timed per layout and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each times every layout once, in turn")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument(
        "--peer",
        action="store_true",
        help=f"also time '{PEER}': the padded batches through transformers' LlavaForConditionalGeneration "
        "built around the same modules (an mlp2x_gelu recipe)",
    )
    ap.add_argument("--json", default="", help="also write the result to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.recipe, args.overrides)
    torch.manual_seed(cfg.train.seed)
    model, processor = build_model(cfg)
    model.train()
    optimizer = make_optimizer(model, cfg)
    average = cfg.train.loss_average
    layouts = [*LAYOUTS, PEER] if args.peer else list(LAYOUTS)
    llava = {layout: None for layout in layouts}
    if args.peer:
        llava[PEER] = llava_view(model, processor.stop_token_ids, processor.tokenizer.pad_token_id).train()
    data = {
        LAYOUTS[0]: take_batches(cfg, processor, args.batches, padding_free=False),
        LAYOUTS[1]: take_batches(cfg, processor, args.batches, padding_free=True),
    }
    data[LAYOUTS[2]] = data[LAYOUTS[1]]
    data[PEER] = data[LAYOUTS[0]]
    real = sum(count_tokens(b) for b in data[LAYOUTS[0]])
    padded = sum(b["input_ids"].numel() for b in data[LAYOUTS[0]])
    computed = {LAYOUTS[0]: padded, LAYOUTS[1]: real, LAYOUTS[2]: real, PEER: padded}
    losses = {}
    for layout in layouts:
        set_layout(model, layout)
        losses[layout] = first_loss(model, data[layout][0], average, llava[layout])
    for layout in layouts:  # warm-up: one step each
        set_layout(model, layout)
        step(model, optimizer, data[layout][0], average, llava[layout])
    times: dict[str, list[float]] = {layout: [] for layout in layouts}
    for r in range(args.rounds):
        for layout in layouts:
            set_layout(model, layout)
            t0 = time.perf_counter()
            for batch in data[layout]:
                step(model, optimizer, batch, average, llava[layout])
            times[layout].append((time.perf_counter() - t0) / args.batches)
            row = {"round": r, "layout": layout, "step_s": round(times[layout][-1], 4)}
            print(json.dumps(row), flush=True)
    rows = []
    for layout in layouts:
        med = statistics.median(times[layout])
        rows.append(
            {
                "layout": layout,
                "step_s_median": round(med, 4),
                "step_s_min": round(min(times[layout]), 4),
                "step_s_max": round(max(times[layout]), 4),
                "real_tokens_per_s": round(real / args.batches / med),
                "tokens_computed": computed[layout],
                "first_batch_loss": round(losses[layout], 6),
                "speedup_vs_padded": round(statistics.median(times[LAYOUTS[0]]) / med, 3),
            }
        )
    result = {
        "recipe": args.recipe,
        "overrides": args.overrides,
        "batch_size": cfg.train.batch_size,
        "batches": args.batches,
        "rounds": args.rounds,
        "real_tokens": real,
        "padding_fraction": round(1 - real / padded, 4),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "rows": rows,
    }
    print(json.dumps(result, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
