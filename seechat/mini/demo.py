"""`seechat demo`: the whole SEEChat pipeline on the embedded mini world, for real, on a CPU.

    world    procedurally generated Chinese scenes, pairs, conversations, eval sets  (seechat.mini.world)
    experts  the pretrained mini Chinese-CLIP (vision expert + scorer) and mini Chinese LM shipped in
             the package (seechat/mini/weights; `seechat mini experts` retrains them, `--experts` uses those)
    stage1   bridge only, on pair shards        seechat/mini/recipes/stage1.yaml, via seechat.train.train
    stage2   bridge + LM, on conversations      seechat/mini/recipes/stage2.yaml, via seechat.train.train
    eval     held-out test split: VQA per type next to a blind control (the same questions about a blank
             image), grounding Acc@0.5, detection mAP@0.5, captions, win rate vs alt-text

Everything goes under `--out` (default runs/mini): the ready checkpoint is `<out>/stage2` and the
numbers are `<out>/results.json`. A finished step is reused when run again (same config) unless
`--redo` names it. The recipes are the same YAML files and the same `train` function a 7B run uses;
the demo only points their paths at `--out`. The recipes ship inside the package (package data),
so an installed seechat runs the demo from any folder.

What this module is not: the command line (`seechat.cli.demo` parses the options and prints the
results); progress goes to this module's logger.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from seechat.config import load_config, to_dict
from seechat.data.boxes import parse_box
from seechat.data.images import load_image
from seechat.data.jsonl import read_jsonl
from seechat.eval.grounding import box_iou
from seechat.eval.tasks import caption_exact_match
from seechat.eval.vqa import answers_match
from seechat.infer.chat import ChatSession
from seechat.infer.sampling import SamplingParams
from seechat.mini.evaluate import evaluate_split
from seechat.mini.experts import ExpertPaths, shipped_experts
from seechat.mini.world import WorldConfig, build_world
from seechat.model import load
from seechat.train.loop import train

log = logging.getLogger(__name__)
STEPS = ("world", "stage1", "stage2", "eval")
RECIPES = Path(__file__).resolve().parent / "recipes"  # package data: the stage recipes of the mini world


@dataclass(frozen=True)
class Assets:
    """What the stage recipes read: the world and the two experts (the CLIP is also the scorer)."""

    world: Path
    vision: Path
    lm: Path
    lm_tokenizer: Path
    scorer: Path

    @classmethod
    def of_run(cls, run: Path, experts: ExpertPaths | None = None) -> Assets:
        """The world of run folder `run` and a pair of experts (default: the shipped ones)."""
        e = experts or shipped_experts()
        return cls(Path(run) / "world", e.clip, e.lm, e.lm_tokenizer, e.clip)


def stage_overrides(
    assets: Assets, stage: str, out_dir: Path, bridge: str | None = None, init_from: Path | None = None
) -> list[str]:
    """Point a mini recipe at the world and experts, write to `out_dir` (optionally another bridge)."""
    over = [
        f"model.vision.path={assets.vision}",
        f"model.lm.path={assets.lm}",
        f"model.lm.tokenizer_path={assets.lm_tokenizer}",
        f"train.output_dir={out_dir}",
    ]
    if bridge:
        over.append(f"model.bridge.type={bridge}")
    if stage == "stage1":
        over.append(f"data.paths=[{assets.world / 'pairs' / 'train'}/*.tar]")
    else:
        over += [
            f"data.paths=[{assets.world / 'instruct' / 'train.jsonl'}]",
            f"data.image_root={assets.world}",
        ]
    if init_from is not None:
        over.append(f"train.init_from={init_from}")
    return over


def _done(out_dir: Path, cfg_dict: dict) -> bool:
    summary, run = out_dir / "train" / "summary.json", out_dir / "train" / "run.yaml"
    if not summary.is_file() or not run.is_file():
        return False
    return json.loads(summary.read_text()).get("status") == "done" and to_dict(load_config(run)) == cfg_dict


def run_stage(
    assets: Assets,
    out_dir: Path,
    stage: str,
    bridge: str | None,
    extra: list[str],
    redo: bool = False,
    init_from: Path | None = None,
) -> Path:
    """Train one mini stage (or reuse a finished run with the same config); later overrides win."""
    cfg = load_config(
        RECIPES / f"{stage}.yaml", stage_overrides(assets, stage, out_dir, bridge, init_from) + extra
    )
    target = Path(cfg.train.output_dir)
    if not redo and _done(target, to_dict(cfg)):
        log.info(f"[{stage}] reusing finished run in {target}")
        return target
    train(cfg, resume=not redo)
    return target


def sample_dialogue(checkpoint: Path, world: Path) -> tuple[str, list[dict[str, object]]]:
    """A short multi-turn chat about the first test image that has a referring expression: a
    description, the number of objects, and the box of one object named as the world's grounding
    data names it. -> (the image's path in the world, the turns); each turn: user, assistant, the
    truth about the image (`reference`) and whether the reply matches it (`right`: a caption
    reference up to normalisation, the count as VQA counts it, the box at IoU >= 0.5)."""
    captions = {r["image"]: r for r in read_jsonl(world / "test" / "captions.jsonl")}
    objects = {r["image"]: r["objects"] for r in read_jsonl(world / "test" / "detection.jsonl")}
    grounding = next(r for r in read_jsonl(world / "test" / "grounding.jsonl") if r["image"] in objects)
    row = captions[grounding["image"]]
    truth = grounding["box"]
    checks = [
        (
            "请用一句话描述这张图片。",
            row["references"][0],
            lambda a: caption_exact_match(a, row["references"]),
        ),
        ("图中有几个图形？", str(len(objects[row["image"]])), None),
        (
            f"请给出{grounding['expression']}的位置（坐标框）。",
            grounding["answer"],
            lambda a: (b := parse_box(a)) is not None and float(box_iou([b], [truth])[0]) >= 0.5,
        ),
    ]
    model, processor = load(checkpoint)
    image = load_image(world / row["image"])
    chat = ChatSession(model, processor)
    turns: list[dict[str, object]] = []
    for question, reference, check in checks:
        answer = chat.ask(question, [image] if not turns else [], SamplingParams(max_new_tokens=64))
        right = check(answer) if check is not None else answers_match(answer, reference)
        turns.append({"user": question, "assistant": answer, "reference": reference, "right": right})
    return row["image"], turns


def demo(
    out: str | Path = "runs/mini",
    redo: tuple[str, ...] = (),
    bridge: str | None = None,
    experts: ExpertPaths | None = None,
    world_cfg: WorldConfig | None = None,
    stage_extra: dict[str, list[str]] | None = None,
    eval_limit: int = 0,
) -> dict:
    """Run (or reuse) every step under `out`, from `experts` (default: the shipped ones); returns the
    results written to `<out>/results.json`. The keyword arguments after `experts` shrink the run for
    tests."""
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    extra = stage_extra or {}
    world = out / "world"
    log.info(
        "[world] building the mini world"
        if "world" in redo or not (world / "manifest.json").exists()
        else f"[world] reusing {world}"
    )
    build_world(world, world_cfg or WorldConfig(), force="world" in redo, workers=2)
    assets = Assets.of_run(out, experts)
    log.info(f"[experts] pretrained mini Chinese-CLIP {assets.vision} and mini Chinese LM {assets.lm}")
    s1 = run_stage(assets, out / "stage1", "stage1", bridge, extra.get("stage1", []), "stage1" in redo)
    s2 = run_stage(
        assets, out / "stage2", "stage2", bridge, extra.get("stage2", []), "stage2" in redo, init_from=s1
    )
    t_train = time.time() - t0

    log.info("[eval] held-out test split")
    model, processor = load(s2)
    results = evaluate_split(
        model, processor, world, out / "eval" / "stage2", assets.scorer, "test", eval_limit
    )
    results["wall_seconds"] = time.time() - t0
    results["train_wall_seconds"] = t_train
    results["checkpoint"] = str(s2)
    results["sample_dialogue_image"], results["sample_dialogue"] = sample_dialogue(s2, world)
    (out / "results.json").write_text(json.dumps(results, ensure_ascii=False, indent=2), encoding="utf-8")

    return results
