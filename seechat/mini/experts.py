"""The mini single-modal experts, trained from scratch on the mini world by the project's recipes.

One import for everything a caller needs; the concepts live in their own modules:

- `seechat.mini.mini_clip` — the mini Chinese-CLIP (`ChineseCLIPModel` + BERT char tokenizer +
  64-px image processor, one folder). Its vision half is the mini vision expert
  (`VisionConfig(path=clip_dir)`, penultimate-layer patches); the whole model is the mini relevance
  scorer (`ChineseClipScorer.from_pretrained(clip_dir)`).
- `seechat.mini.mini_lm` — the mini Chinese LM (`Qwen2ForCausalLM` + ChatML char tokenizer in
  `lm_dir/tokenizer`: `LMConfig(path=lm_dir, tokenizer_path=lm_dir/"tokenizer")`).
- `seechat.mini.expert_common` — recipe plumbing: skip-if-done marker, atomic output, the training
  loop with its progress bar, `metrics.jsonl` and `loss.png`.

Every run is deterministic by `recipe.seed`, and a finished output (`done.json` with the same recipe
and world config) is reused unless `force=True`. Not here: the world (`seechat.mini.world`), stage 1
and stage 2 (`seechat.train`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from seechat.mini.expert_common import PathLike, world_chars, world_texts
from seechat.mini.mini_clip import ClipRecipe, evaluate_clip, train_mini_clip
from seechat.mini.mini_lm import LMRecipe, evaluate_lm, train_mini_lm

__all__ = [
    "ClipRecipe", "ExpertPaths", "LMRecipe", "evaluate_clip", "evaluate_lm", "train_experts", "train_mini_clip",
    "train_mini_lm", "world_chars", "world_texts",
]


@dataclass(frozen=True)
class ExpertPaths:
    """Where `train_experts` put the experts; feed these to `VisionConfig` / `LMConfig`."""

    clip: Path  # VisionConfig(path=clip); also the scorer
    lm: Path  # LMConfig(path=lm, tokenizer_path=lm_tokenizer)
    lm_tokenizer: Path


def train_experts(world_root: PathLike, out_dir: PathLike, clip: ClipRecipe = ClipRecipe(), lm: LMRecipe = LMRecipe(),
                  *, force: bool = False, threads: int | None = None) -> ExpertPaths:
    """Both mini experts into `out_dir/clip` and `out_dir/lm`, one after the other (never in parallel:
    each uses every core)."""
    out = Path(out_dir)
    clip_dir = train_mini_clip(world_root, out / "clip", clip, force=force, threads=threads)
    lm_dir = train_mini_lm(world_root, out / "lm", lm, force=force, threads=threads)
    return ExpertPaths(clip_dir, lm_dir, lm_dir / "tokenizer")
