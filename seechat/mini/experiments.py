"""The evaluation experiments, reproduced on the mini world: `seechat experiment seed|data-quality`.

**seed** — SEEChat's caption win-rate figure. Every image of the test split (never seen in
training) is captioned by seven methods and each (image, caption) is scored by the mini
Chinese-CLIP; a method wins an image when its caption scores highest (ties split the win):

    alt_text          the world's noisy web alt-text of the image (the original text of a web image)
    blind_lm          the mini LM alone, never shown the image; it samples (T = 1, fixed seed), since
                      greedy decoding would give every image the same caption
    stage1_only       the mlp2x_gelu bridge after stage 1 (vision and LM frozen)
    stage2_<bridge>   stage 1 then stage 2 with each bridge: linear, mlp2x_gelu, qformer, resampler

**data-quality** — is a filtered half worth more than all of the noisy data? Stage 1 is trained on
the web text of the pair shards (`data.text_field=txt`, the noisy alt-text; partly right, partly
wrong, partly junk): N pairs kept by the scorer (the top half of all 2N by score) vs N unfiltered
pairs (the first half of the shards) vs all 2N unfiltered, each with the same stage-1 steps, then
the same stage 2. Reported: held-out VQA accuracy of each stage-2 model and the caption win rate
among them (and among the three stage-1-only models, which show stage 1's effect undiluted).

Every model uses the demo's recipes (`seechat/mini/recipes/`) and the one `train` function; a finished
stage is reused. Results: `<out>/results.json`, `<out>/report.md`, and the win-rate reports
(table, head-to-head matrix, per-image CSV, bar chart) under `<out>/winrate*/`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from seechat.data.filter import KeepRule, count_samples, filter_shards
from seechat.data.image_sources import JsonlImages
from seechat.data.jsonl import read_jsonl, write_jsonl
from seechat.data.scorer import ChineseClipScorer
from seechat.eval.winrate import WinRateResult, run_winrate
from seechat.mini.demo import Assets, run_stage
from seechat.mini.evaluate import answer_split, load_images
from seechat.model import load

log = logging.getLogger(__name__)
BRIDGE_NAMES = ("linear", "mlp2x_gelu", "qformer", "resampler")
BLIND_PROMPT = "请用一句话描述这张图片。"


@dataclass(frozen=True)
class Options:
    """What every experiment shares: the inputs, the split, and per-stage recipe overrides."""

    assets: Assets
    split: str = "test"
    limit: int = 0  # images (0 = all of the split)
    stage_extra: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (("stage1", ("train.max_steps=2",)), …)
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    batch_size: int = 64
    n_bootstrap: int = 1000
    seed: int = 0

    def extra(self, stage: str) -> list[str]:
        return [o for s, overrides in self.stage_extra if s == stage for o in overrides]

    def caption_rows(self) -> list[dict]:
        rows = read_jsonl(self.assets.world / self.split / "captions.jsonl")
        return rows[: self.limit] if self.limit else rows


def train_pair(opts: Options, dest: Path, bridge: str, stage1_extra: Sequence[str] = ()) -> tuple[Path, Path]:
    """Stage 1 then stage 2 with `bridge` under `dest`; finished stages are reused."""
    s1 = run_stage(opts.assets, dest / "stage1", "stage1", bridge, [*stage1_extra, *opts.extra("stage1")])
    s2 = run_stage(opts.assets, dest / "stage2", "stage2", bridge, opts.extra("stage2"), init_from=s1)
    return s1, s2


def evaluate_checkpoint(
    checkpoint: Path, opts: Options, rows: list[dict], images: dict[str, Image.Image], detection: bool = False
) -> dict:
    """Greedy captions of the split images (`rows`), plus VQA accuracy (per type) and grounding
    Acc@0.5 on the split's questions and referring expressions about those images (and with
    `detection`, detection mAP@0.5 on the split's detection requests about them)."""
    model, processor = load(checkpoint, device=opts.device)
    split = opts.assets.world / opts.split
    vqa = [r for r in read_jsonl(split / "vqa.jsonl") if r["image"] in images]
    grd = [r for r in read_jsonl(split / "grounding.jsonl") if r["image"] in images]
    det = [r for r in read_jsonl(split / "detection.jsonl") if r["image"] in images] if detection else None
    metrics, preds = answer_split(
        model,
        processor,
        images,
        vqa,
        grd,
        rows,
        opts.batch_size,
        tag=f"{checkpoint.parent.name}/{checkpoint.name}",
        detection=det,
    )
    return {"captions": preds["captions"], **metrics}


@torch.inference_mode()
def blind_captions(opts: Options, n: int, max_new_tokens: int = 48) -> list[str]:
    """`n` captions sampled from the LM expert alone for the caption instruction (no image)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(opts.assets.lm_tokenizer)
    lm = AutoModelForCausalLM.from_pretrained(opts.assets.lm).to(opts.device).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": BLIND_PROMPT}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(opts.device)
    torch.manual_seed(opts.seed)
    out: list[str] = []
    while len(out) < n:
        k = min(opts.batch_size, n - len(out))
        gen = lm.generate(
            ids.expand(k, -1),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        out += [tokenizer.decode(g[ids.shape[1] :], skip_special_tokens=True).strip() for g in gen]
    return out


def score_methods(
    opts: Options, rows: list[dict], captions: dict[str, list[str]], out: Path
) -> WinRateResult:
    """Write one captions JSONL per method and run the win-rate experiment over all of them."""
    files = {}
    for method, caps in captions.items():
        files[method] = out / "captions" / f"{method}.jsonl"
        files[method].parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(
            files[method], [{"image": r["image"], "caption": c} for r, c in zip(rows, caps, strict=True)]
        )
    images = out / "images.jsonl"
    write_jsonl(images, [{"image": r["image"]} for r in rows])
    source = JsonlImages(images, image_root=opts.assets.world)
    scorer = ChineseClipScorer.from_pretrained(str(opts.assets.scorer), device=opts.device)
    return run_winrate(
        source.ids, source.load, files, scorer, out, n_bootstrap=opts.n_bootstrap, seed=opts.seed
    )


def winrate_summary(result: WinRateResult) -> dict[str, dict[str, float]]:
    return {
        m: {
            "win_rate": float(result.win_rate[i]),
            "ci95": [float(result.ci_low[i]), float(result.ci_high[i])],
            "mean_score": float(result.mean_score[i]),
        }
        for i, m in enumerate(result.methods)
    }


def seed_experiment(opts: Options, out: Path) -> dict:
    """Seven methods captioning the held-out images, scored by the mini Chinese-CLIP."""
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    rows = opts.caption_rows()
    images = load_images(opts.assets.world, rows)
    alt = {r["image"]: r["caption"] for r in read_jsonl(opts.assets.world / opts.split / "alt_text.jsonl")}
    captions = {"alt_text": [alt[r["image"]] for r in rows], "blind_lm": blind_captions(opts, len(rows))}
    models: dict[str, dict] = {}
    for bridge in BRIDGE_NAMES:
        s1, s2 = train_pair(opts, out / "models" / bridge, bridge)
        for name, ckpt in ([("stage1_only", s1)] if bridge == "mlp2x_gelu" else []) + [
            (f"stage2_{bridge}", s2)
        ]:
            models[name] = evaluate_checkpoint(ckpt, opts, rows, images)
            captions[name] = models[name].pop("captions")
    result = score_methods(opts, rows, captions, out / "winrate")
    results = {
        "experiment": "seed",
        "split": opts.split,
        "images": len(rows),
        "methods": winrate_summary(result),
        "models": models,
        "device": opts.device,
        "wall_seconds": time.time() - t0,
    }
    (out / "results.json").write_text(json.dumps(results, ensure_ascii=False, indent=1), encoding="utf-8")
    return results


def data_quality_experiment(opts: Options, out: Path, bridge: str = "mlp2x_gelu") -> dict:
    """Stage 1 on N scorer-filtered vs N noisy vs 2N noisy pairs (web text), the same stage 2 after."""
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    shards = sorted(str(p) for p in (opts.assets.world / "pairs" / "train").glob("*.tar"))
    if len(shards) < 2:
        raise ValueError(f"the data-quality experiment needs at least 2 training shards, found {len(shards)}")
    filtered = out / "filtered_shards"
    if not (filtered / "filter_stats.json").is_file():
        scorer = ChineseClipScorer.from_pretrained(str(opts.assets.scorer), device=opts.device)
        filter_shards(
            shards,
            filtered,
            scorer,
            KeepRule(top_fraction=0.5),
            text_field="txt",
            overwrite=True,
            progress=True,
        )
    variants = {
        "filtered_N": sorted(str(p) for p in filtered.glob("*.tar")),
        "noisy_N": shards[: len(shards) // 2],
        "noisy_2N": shards,
    }
    rows = opts.caption_rows()
    images = load_images(opts.assets.world, rows)
    s1_caps, s2_caps, results = {}, {}, {"experiment": "data-quality", "split": opts.split, "variants": {}}
    for name, paths in variants.items():
        over = [f"data.paths=[{','.join(paths)}]", "data.text_field=txt"]
        s1, s2 = train_pair(opts, out / "models" / name, bridge, over)
        ev2, ev1 = evaluate_checkpoint(s2, opts, rows, images), evaluate_checkpoint(s1, opts, rows, images)
        s2_caps[f"stage2_{name}"], s1_caps[f"stage1_{name}"] = ev2.pop("captions"), ev1.pop("captions")
        results["variants"][name] = {
            "shards": len(paths),
            "pairs": count_samples(paths),
            **ev2,
            "stage1_only": ev1,
        }
    alt = {r["image"]: r["caption"] for r in read_jsonl(opts.assets.world / opts.split / "alt_text.jsonl")}
    alt_caps = [alt[r["image"]] for r in rows]
    results["winrate_stage2"] = winrate_summary(
        score_methods(opts, rows, {**s2_caps, "alt_text": alt_caps}, out / "winrate_stage2")
    )
    results["winrate_stage1_only"] = winrate_summary(
        score_methods(opts, rows, {**s1_caps, "alt_text": alt_caps}, out / "winrate_stage1_only")
    )
    results["filter"] = json.loads((filtered / "filter_stats.json").read_text())
    results["device"], results["wall_seconds"] = opts.device, time.time() - t0
    (out / "results.json").write_text(json.dumps(results, ensure_ascii=False, indent=1), encoding="utf-8")
    return results
