"""The mini single-modal experts, trained from scratch on the mini world by the project's recipes.

One import for everything a caller needs; the concepts live in their own modules:

- `seechat.mini.clip_expert` — the mini Chinese-CLIP (`ChineseCLIPModel` + BERT char tokenizer +
  64-px image processor, one folder). Its vision half is the mini vision expert
  (`VisionConfig(path=clip_dir)`, penultimate-layer patches); the whole model is the mini relevance
  scorer (`ChineseClipScorer.from_pretrained(clip_dir)`).
- `seechat.mini.lm_expert` — the mini Chinese LM (`Qwen2ForCausalLM` + ChatML char tokenizer in
  `lm_dir/tokenizer`: `LMConfig(path=lm_dir, tokenizer_path=lm_dir/"tokenizer")`).
- `seechat.mini.fresh` — their training data: fresh scenes every step, never a held-out one.
- `seechat.mini.expert_training` — recipe plumbing: skip-if-done marker, atomic output, the training
  loop with its progress bar, `metrics.jsonl` and `loss.png`.

The package ships the pair the default recipes made (`SHIPPED`, `shipped_experts()`), and the demo
starts from it; `seechat mini experts` (seechat.cli.mini_experts) retrains them. Every run is deterministic by
`recipe.seed`, and a finished output (`done.json` with the same recipe and world-generator
fingerprint) is reused unless `force=True`. Not here: the world (`seechat.mini.world`), stage 1 and
stage 2 (`seechat.train`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from seechat.mini.clip_expert import ClipRecipe, evaluate_clip, train_mini_clip
from seechat.mini.expert_training import PathLike, world_texts
from seechat.mini.lm_expert import LMRecipe, evaluate_lm, train_mini_lm

__all__ = [
    "SHIPPED",
    "ClipRecipe",
    "ExpertPaths",
    "LMRecipe",
    "evaluate_clip",
    "evaluate_experts",
    "evaluate_lm",
    "shipped_experts",
    "train_experts",
    "train_mini_clip",
    "train_mini_lm",
    "world_texts",
]


SHIPPED = Path(__file__).resolve().parent / "weights"  # package data: the experts the demo starts from


@dataclass(frozen=True)
class ExpertPaths:
    """Where a pair of experts is; feed these to `VisionConfig` / `LMConfig`."""

    clip: Path  # VisionConfig(path=clip); also the scorer
    lm: Path  # LMConfig(path=lm, tokenizer_path=lm_tokenizer)
    lm_tokenizer: Path

    @classmethod
    def of(cls, directory: PathLike) -> ExpertPaths:
        """The experts of a `seechat mini experts --out DIR` folder (DIR/clip, DIR/lm)."""
        d = Path(directory)
        return cls(d / "clip", d / "lm", d / "lm" / "tokenizer")


def shipped_experts() -> ExpertPaths:
    """The pretrained mini experts inside the package (fp16 safetensors, with their recipe records:
    `done.json` holds the recipe and the world-generator fingerprint, `eval.json` their held-out
    scores, `metrics.jsonl` and `loss.png` the run); `seechat mini experts` retrains them."""
    return ExpertPaths.of(SHIPPED)


def train_experts(
    out_dir: PathLike,
    clip: ClipRecipe = ClipRecipe(),
    lm: LMRecipe = LMRecipe(),
    *,
    force: bool = False,
    threads: int | None = None,
    device: str = "cpu",
    workers: int = 0,
) -> ExpertPaths:
    """Both mini experts into `out_dir/clip` and `out_dir/lm`, one after the other (never in parallel:
    each uses every core), on fresh scenes from the world's generators."""
    out = Path(out_dir)
    train_mini_clip(out / "clip", clip, force=force, threads=threads, device=device, workers=workers)
    train_mini_lm(out / "lm", lm, force=force, threads=threads, device=device, workers=workers)
    return ExpertPaths.of(out)


# --------------------------------------------------------------------------- `seechat mini experts`
# (the verb itself is seechat.cli.mini_experts)

RECIPES = {"clip": ClipRecipe, "lm": LMRecipe}


def recipe_overrides(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """["lm.steps=8000", "clip.box_weight=0"] -> {"lm": {"steps": 8000}, "clip": {"box_weight": 0.0}};
    the value is converted to the field's type, and an unknown expert or field is an error naming the
    valid ones."""
    out: dict[str, dict[str, Any]] = {"clip": {}, "lm": {}}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        expert, _, name = key.partition(".")
        if not sep or expert not in RECIPES:
            raise ValueError(f"{pair!r}: expected EXPERT.FIELD=VALUE with EXPERT one of {sorted(RECIPES)}")
        types = {f.name: f.type for f in fields(RECIPES[expert])}
        if name not in types:
            raise ValueError(
                f"{pair!r}: {expert} recipes have no field {name!r}; valid: {', '.join(sorted(types))}"
            )
        out[expert][name] = {"int": int, "float": float, "str": str}[str(types[name])](value)
    return out


def evaluate_experts(trained: dict[str, Path], world: PathLike) -> dict[str, dict]:
    """Score each trained expert ({"clip": dir, "lm": dir}) on `world`'s val split; each result is
    also written to `<dir>/eval.json`."""
    results = {}
    for name, directory in trained.items():
        result = (evaluate_clip if name == "clip" else evaluate_lm)(directory, world)
        (directory / "eval.json").write_text(
            json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8"
        )
        results[name] = result
    return results
