"""`seechat <verb>`: the command line, the top of the stack (docs/architecture.md).

Every verb is one row of `VERBS`: its words, a one-line help, and the module under `seechat.cli`
that implements it. Each verb module has exactly two functions, `add_arguments(parser)` and
`run(args) -> int` (the exit code), and holds all of the verb's argparse, printing and exit codes;
the library below takes Python values and returns results. Verb modules are imported only when
their verb runs, so `seechat --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Verb:
    words: tuple[str, ...]
    help: str
    module: str  # under seechat.cli; has add_arguments(parser) and run(args) -> int

    def load(self) -> ModuleType:
        return importlib.import_module(f"seechat.cli.{self.module}")


VERBS: tuple[Verb, ...] = (
    Verb(
        ("demo",),
        "build the mini world, stage 1 + stage 2 from the shipped experts, evaluate (the main job)",
        "demo",
    ),
    Verb(
        ("mini", "experts"),
        "retrain the shipped mini experts (mini Chinese-CLIP, mini Chinese LM) from scratch",
        "mini_experts",
    ),
    Verb(
        ("selfcheck",),
        "build a tiny random model from real architectures and chat one turn",
        "selfcheck",
    ),
    Verb(
        ("train",),
        "train a stage from a YAML recipe plus key=value overrides",
        "train",
    ),
    Verb(
        ("estimate",),
        "per-GPU memory and wall time of a recipe on N GPUs (every assumption printed)",
        "estimate",
    ),
    Verb(
        ("merge-lora",),
        "fold LoRA adapters of a checkpoint into full weights",
        "merge_lora",
    ),
    Verb(
        ("chat",),
        "multi-turn terminal chat about images, streaming",
        "chat",
    ),
    Verb(
        ("caption",),
        "batch-caption images (folder, list or shards) into a JSONL",
        "caption",
    ),
    Verb(
        ("serve",),
        "OpenAI-compatible HTTP API and browser chat page",
        "serve",
    ),
    Verb(
        ("export",),
        "export a checkpoint to another layout (llava-hf)",
        "export",
    ),
    Verb(
        ("eval", "winrate"),
        "caption win-rate experiment scored by Chinese-CLIP",
        "eval_winrate",
    ),
    Verb(
        ("eval", "vqa"),
        "run a checkpoint on a VQA set: predictions, accuracy per question type, report",
        "eval_vqa",
    ),
    Verb(
        ("eval", "caption"),
        "run a checkpoint on a caption set: predictions, CIDEr-D, BLEU-4, exact match, report",
        "eval_caption",
    ),
    Verb(
        ("eval", "grounding"),
        "run a checkpoint on a grounding set: predictions, Acc@0.5, parse failures, report",
        "eval_grounding",
    ),
    Verb(
        ("eval", "detection"),
        "run a checkpoint on a detection set (list every object with its box): mAP@0.5, recall per class",
        "eval_detection",
    ),
    Verb(
        ("experiment", "seed"),
        "mini world: 7 captioning methods on held-out images, win rate by Chinese-CLIP",
        "experiment_seed",
    ),
    Verb(
        ("experiment", "fusion"),
        "mini world: shallow (LM full / frozen / LoRA) vs deep fusion; VQA, grounding, detection, forgetting",
        "experiment_fusion",
    ),
    Verb(
        ("experiment", "data-quality"),
        "mini world: stage 1 on N filtered vs N noisy vs 2N noisy pairs",
        "experiment_data_quality",
    ),
    Verb(
        ("data", "shards"),
        "turn TSV/CSV/JSONL image-caption lists into webdataset shards",
        "data_shards",
    ),
    Verb(
        ("data", "convert"),
        "convert LLaVA / MiniGPT-4 / ShareGPT data to seechat conversations",
        "data_convert",
    ),
    Verb(
        ("data", "translate"),
        "translate instruction data EN->ZH with a transformers model",
        "data_translate",
    ),
    Verb(
        ("data", "filter"),
        "keep image-caption pairs of shards by Chinese-CLIP score",
        "data_filter",
    ),
)


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
    module = verb.load()
    module.add_arguments(parser)
    # intermixed: `seechat train RECIPE --no-resume key=value` and `seechat estimate RECIPE --gpus 8
    # key=value` take their overrides after options too (plain parse_args refuses them there)
    args = parser.parse_intermixed_args(rest)
    return int(module.run(args))
