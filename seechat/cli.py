"""`seechat <verb>`: thin wrappers over importable functions.

Every verb is one row of `VERBS`: its words, a one-line help, and two "module:function" names —
one that adds the verb's arguments to an argparse parser and one that runs it and returns an exit
code. Modules are imported only when their verb runs, so `seechat --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Verb:
    words: tuple[str, ...]
    help: str
    add_arguments: str  # "module:function(parser)"
    run: str  # "module:function(args) -> int"


VERBS: tuple[Verb, ...] = (
    Verb(
        ("demo",),
        "build the mini world, train experts + stage 1 + stage 2, evaluate (the main job)",
        "seechat.mini.demo:add_arguments",
        "seechat.mini.demo:run_from_args",
    ),
    Verb(
        ("mini", "experts"),
        "retrain the shipped mini experts (mini Chinese-CLIP, mini Chinese LM) from scratch",
        "seechat.mini.experts:add_arguments",
        "seechat.mini.experts:run_from_args",
    ),
    Verb(
        ("selfcheck",),
        "build a tiny random model from real architectures and chat one turn",
        "seechat.selfcheck:add_arguments",
        "seechat.selfcheck:run_from_args",
    ),
    Verb(
        ("train",),
        "train a stage from a YAML recipe plus key=value overrides",
        "seechat.train.loop:add_arguments",
        "seechat.train.loop:run_from_args",
    ),
    Verb(
        ("estimate",),
        "per-GPU memory and wall time of a recipe on N GPUs (every assumption printed)",
        "seechat.estimate:add_arguments",
        "seechat.estimate:run_from_args",
    ),
    Verb(
        ("merge-lora",),
        "fold LoRA adapters of a checkpoint into full weights",
        "seechat.model.checkpoint_cli:add_merge_arguments",
        "seechat.model.checkpoint_cli:run_merge",
    ),
    Verb(
        ("chat",),
        "multi-turn terminal chat about images, streaming",
        "seechat.infer.chat_cli:add_arguments",
        "seechat.infer.chat_cli:run_from_args",
    ),
    Verb(
        ("caption",),
        "batch-caption images (folder, list or shards) into a JSONL",
        "seechat.infer.caption_cli:add_arguments",
        "seechat.infer.caption_cli:run_from_args",
    ),
    Verb(
        ("serve",),
        "OpenAI-compatible HTTP API and browser chat page",
        "seechat.serve.app:add_arguments",
        "seechat.serve.app:run_from_args",
    ),
    Verb(
        ("export",),
        "export a checkpoint to another layout (llava-hf)",
        "seechat.model.export:add_arguments",
        "seechat.model.export:run_from_args",
    ),
    Verb(
        ("eval", "winrate"),
        "caption win-rate experiment scored by Chinese-CLIP",
        "seechat.eval.winrate_cli:add_winrate_arguments",
        "seechat.eval.winrate_cli:run_winrate_from_args",
    ),
    Verb(
        ("eval", "vqa"),
        "run a checkpoint on a VQA set: predictions, accuracy per question type, report",
        "seechat.eval.run_cli:add_vqa_arguments",
        "seechat.eval.run_cli:run_from_args",
    ),
    Verb(
        ("eval", "caption"),
        "run a checkpoint on a caption set: predictions, CIDEr-D, BLEU-4, exact match, report",
        "seechat.eval.run_cli:add_caption_arguments",
        "seechat.eval.run_cli:run_from_args",
    ),
    Verb(
        ("eval", "grounding"),
        "run a checkpoint on a grounding set: predictions, Acc@0.5, parse failures, report",
        "seechat.eval.run_cli:add_grounding_arguments",
        "seechat.eval.run_cli:run_from_args",
    ),
    Verb(
        ("eval", "detection"),
        "run a checkpoint on a detection set (list every object with its box): mAP@0.5, recall per class",
        "seechat.eval.run_cli:add_detection_arguments",
        "seechat.eval.run_cli:run_from_args",
    ),
    Verb(
        ("experiment", "seed"),
        "mini world: 7 captioning methods on held-out images, win rate by Chinese-CLIP",
        "seechat.mini.experiments:add_arguments",
        "seechat.mini.experiments:run_seed",
    ),
    Verb(
        ("experiment", "fusion"),
        "mini world: shallow (LM full / frozen / LoRA) vs deep fusion; VQA, grounding, detection, forgetting",
        "seechat.mini.fusion_experiment:add_arguments",
        "seechat.mini.fusion_experiment:run_from_args",
    ),
    Verb(
        ("experiment", "data-quality"),
        "mini world: stage 1 on N filtered vs N noisy vs 2N noisy pairs",
        "seechat.mini.experiments:add_arguments",
        "seechat.mini.experiments:run_data_quality",
    ),
    Verb(
        ("data", "shards"),
        "turn TSV/CSV/JSONL image-caption lists into webdataset shards",
        "seechat.data.data_cli:add_shards_arguments",
        "seechat.data.data_cli:run_shards",
    ),
    Verb(
        ("data", "convert"),
        "convert LLaVA / MiniGPT-4 / ShareGPT data to seechat conversations",
        "seechat.data.data_cli:add_convert_arguments",
        "seechat.data.data_cli:run_convert",
    ),
    Verb(
        ("data", "translate"),
        "translate instruction data EN->ZH with a transformers model",
        "seechat.data.data_cli:add_translate_arguments",
        "seechat.data.data_cli:run_translate",
    ),
    Verb(
        ("data", "filter"),
        "keep image-caption pairs of shards by Chinese-CLIP score",
        "seechat.data.data_cli:add_filter_arguments",
        "seechat.data.data_cli:run_filter",
    ),
)


def _resolve(ref: str) -> Callable:
    module, func = ref.split(":")
    return getattr(importlib.import_module(module), func)


def _rows(verbs: Sequence[Verb]) -> str:
    width = max(len(" ".join(v.words)) for v in verbs)
    return "\n".join(f"  {' '.join(v.words):<{width}}  {v.help}" for v in verbs)


def _overview() -> str:
    return (
        "usage: seechat <verb> [options]   (seechat <verb> --help for a verb's options)\n\n"
        "Stitch a vision encoder to a Chinese LLM with a small bridge; train, serve and evaluate.\n\n"
        f"verbs:\n{_rows(VERBS)}\n"
    )


def _match(argv: Sequence[str]) -> tuple[Verb | None, list[str]]:
    for n in (2, 1):
        words = tuple(argv[:n])
        for v in VERBS:
            if v.words == words:
                return v, list(argv[n:])
    return None, list(argv)


def _quiet_transformers() -> None:
    """Our own progress bars and logs say what happens; transformers' per-load bars are noise."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_overview())
        return 0
    if argv[0] in ("-V", "--version"):
        from seechat import __version__

        print(f"seechat {__version__}")
        return 0
    verb, rest = _match(argv)
    if verb is None:
        group = [v for v in VERBS if v.words[0] == argv[0] and len(v.words) > 1]
        if group and len(argv) > 1 and argv[1] in ("-h", "--help", "help"):
            print(f"usage: seechat {argv[0]} <sub-verb> [options]\n\nsub-verbs:\n{_rows(group)}\n")
            return 0
        if group:
            subs = ", ".join(v.words[1] for v in group)
            said = f"unknown verb '{argv[0]} {argv[1]}'; " if len(argv) > 1 else ""
            print(f"seechat: {said}'{argv[0]}' takes a sub-verb: {subs}", file=sys.stderr)
        else:
            known = ", ".join(sorted({v.words[0] for v in VERBS}))
            print(f"seechat: unknown verb '{argv[0]}'; verbs: {known} (see seechat --help)", file=sys.stderr)
        return 2
    _quiet_transformers()
    parser = argparse.ArgumentParser(prog="seechat " + " ".join(verb.words), description=verb.help)
    _resolve(verb.add_arguments)(parser)
    args = parser.parse_args(rest)
    return int(_resolve(verb.run)(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
