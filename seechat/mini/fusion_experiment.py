"""`seechat experiment fusion`: shallow vs deep fusion, and what each costs the LM's own text skills.

From one stage-1 checkpoint (the demo's recipe), four stage-2 models are trained with the same
recipe, steps, batch, learning rate and seed, differing only in what learns:

    shallow_lm_full     bridge + the whole LM (the demo's stage 2)
    shallow_lm_frozen   bridge only
    shallow_lm_lora     bridge + LoRA adapters on the LM (`trainable.lora` defaults)
    deep_lm_frozen      bridge + CogVLM-style visual experts (`model.fusion: deep`), LM frozen

Each is evaluated on the split's images: VQA per question type, grounding Acc@0.5, detection
mAP@0.5, the caption win rate among the four and the world's alt-text (mini Chinese-CLIP), and
the LM's own text-only reading exam (`seechat.mini.lm_expert.reading_scores`: questions about a
scene's description, no image) before (the base LM) and after (the stitched model's LM), which is
how much each mode forgets. A frozen LM cannot forget: by the superset guarantee its text-only
numbers equal the base LM's exactly (tests/model/test_fusion.py). `seeds` repeats stage 2 (not
stage 1) per seed; finished stages are reused. Results: `<out>/results.json` and `<out>/report.md`.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from seechat.data.jsonl import read_jsonl
from seechat.mini.demo import run_stage
from seechat.mini.evaluate import load_images
from seechat.mini.experiments import Options, evaluate_checkpoint, score_methods, winrate_summary
from seechat.mini.lm_expert import reading_scores, split_scenes_of
from seechat.model import load
from seechat.model.checkpoint import read_meta

log = logging.getLogger(__name__)

# mode -> stage-2 overrides on the demo's recipe (seechat/mini/recipes/stage2.yaml)
MODES: dict[str, tuple[str, ...]] = {
    "shallow_lm_full": ("trainable.lm=full",),
    "shallow_lm_frozen": ("trainable.lm=frozen",),
    "shallow_lm_lora": ("trainable.lm=lora",),
    "deep_lm_frozen": ("model.fusion=deep", "trainable.lm=frozen", "trainable.experts=full"),
}
SCALARS = ("vqa_accuracy", "vqa_accuracy_blind", "grounding_acc_at_0.5", "detection_map_at_0.5")


def text_reading(lm: torch.nn.Module, tokenizer, opts: Options, text_limit: int) -> dict:
    """The LM's text-only reading exam on the val split's scenes (never trained on)."""
    scenes = split_scenes_of(opts.assets.world, "val")
    return reading_scores(lm.eval(), tokenizer, scenes[:text_limit] if text_limit else scenes)


def fusion_experiment(
    opts: Options,
    out: Path,
    seeds: tuple[int, ...] = (0,),
    text_limit: int = 100,
    stage1: Path | None = None,
) -> dict:
    """`stage1`: a finished stage-1 checkpoint to start from (its experts are used) instead of
    training one; its pairs must be this world's (a format-2 world of the same seed has the same)."""
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    a = opts.assets
    if stage1 is not None:
        m = read_meta(stage1)["model"]
        a = replace(
            a,
            vision=Path(m["vision"]["path"]),
            lm=Path(m["lm"]["path"]),
            lm_tokenizer=Path(m["lm"]["tokenizer_path"] or m["lm"]["path"]),
        )
        opts = replace(opts, assets=a)
    rows = opts.caption_rows()
    images = load_images(a.world, rows)
    alt = {r["image"]: r["caption"] for r in read_jsonl(a.world / opts.split / "alt_text.jsonl")}
    s1 = stage1 or run_stage(a, out / "stage1", "stage1", None, opts.extra("stage1"))
    key = {"split": opts.split, "images": [r["image"] for r in rows], "text_limit": text_limit}

    def base_reading() -> dict:
        # in the stitched models' dtype (the mini recipes' float32), not the checkpoint's stored fp16:
        # the superset guarantee is per dtype
        base = AutoModelForCausalLM.from_pretrained(a.lm, dtype=torch.float32).to(opts.device)
        return text_reading(base, AutoTokenizer.from_pretrained(a.lm_tokenizer), opts, text_limit)

    before = _cached(
        out / "text_reading_before.json", {**key, "lm": str(a.lm), "dtype": "float32"}, base_reading
    )
    per_seed: dict[int, dict] = {}
    for seed in seeds:
        models, captions = {}, {}
        for mode, over in MODES.items():
            extra = [*over, f"train.seed={seed}", *opts.extra("stage2")]
            s2 = run_stage(a, out / f"seed{seed}" / mode, "stage2", None, extra, init_from=s1)

            def evaluate(s2: Path = s2) -> dict:
                ev = evaluate_checkpoint(s2, opts, rows, images, detection=True)
                model, processor = load(s2, device=opts.device)
                ev["text_reading"] = text_reading(model.language_model, processor.tokenizer, opts, text_limit)
                return ev

            run = (s2 / "train" / "run.yaml").read_text(encoding="utf-8")
            ev = dict(_cached(out / f"seed{seed}" / "evals" / f"{mode}.json", {**key, "run": run}, evaluate))
            captions[mode] = ev.pop("captions")
            models[mode] = ev
        wr = score_methods(
            opts, rows, {**captions, "alt_text": [alt[r["image"]] for r in rows]}, out / f"seed{seed}"
        )
        win = winrate_summary(wr)
        for mode in MODES:
            models[mode]["caption_winrate"] = win[mode]["win_rate"]
        per_seed[seed] = {"models": models, "winrate": win}
    results = {
        "experiment": "fusion",
        "split": opts.split,
        "images": len(rows),
        "seeds": list(seeds),
        "text_reading_before": before,
        "mean": _means(per_seed),
        "per_seed": {str(s): v for s, v in per_seed.items()},
        "device": opts.device,
        "wall_seconds": time.time() - t0,
    }
    (out / "results.json").write_text(json.dumps(results, ensure_ascii=False, indent=1), encoding="utf-8")
    (out / "report.md").write_text(report(results), encoding="utf-8")
    return results


def _cached(path: Path, key: dict, compute) -> dict:
    """`compute()`, or what it returned before for the same `key` (a finished evaluation of an
    unchanged checkpoint on the same rows is reused, as finished stages are)."""
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved["key"] == key:
            return saved["value"]
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "value": value}, ensure_ascii=False), encoding="utf-8")
    return value


def _means(per_seed: dict[int, dict]) -> dict[str, dict[str, float]]:
    """Per mode, the mean over seeds of the headline numbers (VQA per type included)."""
    out: dict[str, dict[str, float]] = {}
    for mode in MODES:
        runs = [r["models"][mode] for r in per_seed.values()]
        row = {k: statistics.mean(m[k] for m in runs) for k in (*SCALARS, "caption_winrate")}
        row["text_qa_exact"] = statistics.mean(m["text_reading"]["qa_exact"] for m in runs)
        for t in runs[0]["vqa_accuracy_by_type"]:
            row[f"vqa_{t}"] = statistics.mean(m["vqa_accuracy_by_type"][t] for m in runs)
        out[mode] = row
    return out


def report(results: dict) -> str:
    """A Markdown table of the mean numbers (what docs/experiments.md quotes)."""
    mean = results["mean"]
    types = sorted(k for k in next(iter(mean.values())) if k.startswith("vqa_") and k not in SCALARS)
    before = results["text_reading_before"]["qa_exact"]
    head = [
        "mode",
        "VQA",
        *(t[4:] for t in types),
        "blind VQA",
        "grounding",
        "det mAP",
        "win rate",
        "text QA",
    ]
    lines = [
        f"# Fusion modes on the mini world ({results['images']} {results['split']} images, "
        f"{len(results['seeds'])} seed(s): {results['seeds']})",
        "",
        f"Text-only reading exam of the base LM (before): {before:.1%}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for mode, m in mean.items():
        cells = [mode, m["vqa_accuracy"], *(m[t] for t in types), m["vqa_accuracy_blind"]]
        cells += [
            m["grounding_acc_at_0.5"],
            m["detection_map_at_0.5"],
            m["caption_winrate"],
            m["text_qa_exact"],
        ]
        lines.append("| " + " | ".join(c if isinstance(c, str) else f"{c:.1%}" for c in cells) + " |")
    return "\n".join(lines) + "\n"
