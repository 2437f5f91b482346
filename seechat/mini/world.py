"""Build the mini world on disk: scenes -> images, web-style pair shards, instructions, eval sets, LM text.

`build_world(out_dir, WorldConfig(...))` writes, with paths relative to the world root::

    manifest.json                     config, counts, file list (written last)
    pairs/{train,val,test}/00000.tar  webdataset shards, img2dataset layout: KEY.jpg KEY.txt KEY.json
                      stats.json ...  (+ ShardWriter's per-shard NNNNN_stats.json)
    images/{train,val,test}/KEY.jpg   the same JPEG bytes as in the shards, as files (LLaVA style)
    instruct/{train,val}.jsonl        LLaVA conversations:
                                      {"id","kind","image","conversations":[{"from","value"}]}
                                      (kinds: INSTRUCT_KINDS, plus "detection" rows after them)
    {val,test}/vqa.jsonl              {"id","image","question","answer","type"}
    {val,test}/grounding.jsonl        {"id","image","expression","box":[x1,y1,x2,y2] 0..1000,"answer"}
    {val,test}/detection.jsonl        {"id","image","question","objects":[{"label": shape,"box"}],"answer"}
    {val,test}/captions.jsonl         {"id","image","references":[canonical, varied...],"detailed"}
    {val,test}/alt_text.jsonl         {"id","image","caption": noisy web alt-text,"kind"}
    text/lm_corpus.jsonl              train scenes only: {"text": ...} rows and {"messages": [...]} rows
    clip/train.jsonl                  {"image","caption"}: clean caption of each train image

Keys are 9-digit zero-padded and unique across splits (train first, then val, then test). In a pair
shard, ``KEY.txt`` is the *web text*: with probability ``clean_fraction`` a clean caption in a
varied phrasing, otherwise noisy alt-text (`seechat.mini.scene_text.ALT_KINDS`). ``KEY.json`` holds
``key, split, caption`` (canonical concise caption), ``detailed``, ``detailed_boxes`` (the same
description with each object's ``<box>``; what stage 1 aligns on), ``alt_text, alt_kind,
web_text_is_clean, web_text`` and ``scene`` (ground truth, `Scene.to_dict`). Note that
``caption`` is the clean caption, not the web text; read ``.txt`` (or ``json:web_text``) for that.

Instruction answers for concise-caption requests are the canonical caption, so exact-match caption
accuracy is measurable; the instructions themselves are varied. LM-corpus questions come with the
scene's detailed caption as context ("图片描述：…"), so they are answerable from text alone.

Splits never share a scene *meaning* (`scenes.fingerprint`): test is drawn first, then val
rejecting test's fingerprints, then train rejecting both. Everything is a function of the config:
the same config gives byte-identical shards, images and JSONL files.

This module is not a data loader (see `seechat.data.pairs`) and not the text/scene logic.
"""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm import tqdm

from seechat.atomic import atomic_directory
from seechat.data.jsonl import dumps_line
from seechat.data.shards import ShardWriter
from seechat.mini import scene_text
from seechat.mini.scenes import Scene, fingerprint, generate_scene, render

FORMAT_VERSION = 3  # 2: pair metadata gained detailed_boxes; 3: detection conversations and eval sets
SPLITS: tuple[str, ...] = ("train", "val", "test")
INSTRUCT_KINDS: tuple[str, ...] = ("concise", "detailed", "vqa", "dialogue", "grounding")


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines the world's bytes."""

    seed: int = 0
    image_size: int = 64  # pixels per side
    max_objects: int = 4  # 1..4
    n_train: int = 6000  # scenes per split
    n_val: int = 300
    n_test: int = 1000
    pairs_per_shard: int = 1000
    clean_fraction: float = 0.3  # share of pair web texts that are clean captions
    jpeg_quality: int = 95
    instruct_per_image: int = 3  # conversations per train/val image
    instruct_weights: tuple[float, ...] = (0.2, 0.15, 0.35, 0.15, 0.15)  # over INSTRUCT_KINDS
    vqa_turns: int = 1  # questions (of different types) per VQA conversation about one image
    grounding_turns: int = 1  # box requests per grounding conversation
    vqa_per_eval_image: int = 2  # val/test VQA questions per image
    caption_references: int = 4  # val/test references per image (canonical + varied)
    lm_dialogue_prob: float = 0.5  # per train scene: chance of a description-grounded dialogue row
    chitchat_per_scene: float = 0.3  # per train scene: expected text-only chit-chat rows
    # per train/val image: expected "list every object with its box" conversations, drawn from a
    # random stream of their own, so every other file of the world is what format 2 wrote
    detection_per_image: float = 0.5

    def __post_init__(self) -> None:
        if len(self.instruct_weights) != len(INSTRUCT_KINDS):
            raise ValueError(f"instruct_weights needs {len(INSTRUCT_KINDS)} weights for {INSTRUCT_KINDS}")
        if not 1 <= self.max_objects <= 4:
            raise ValueError("max_objects must be in 1..4")
        if not 0.0 <= self.clean_fraction <= 1.0:
            raise ValueError("clean_fraction must be in [0, 1]")

    def n_scenes(self, split: str) -> int:
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}[split]

    def key_offset(self, split: str) -> int:
        """Index of the split's first key; keys are unique across splits."""
        return {"train": 0, "val": self.n_train, "test": self.n_train + self.n_val}[split]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorldConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown WorldConfig keys {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class WorldManifest:
    """What `build_world` wrote; `files` are relative to `root`."""

    root: Path
    config: WorldConfig
    counts: dict[str, int] = field(default_factory=dict)
    files: tuple[str, ...] = ()

    def path(self, relative: str) -> Path:
        return self.root / relative

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "config": asdict(self.config),
            "counts": self.counts,
            "files": list(self.files),
        }


def load_manifest(root: str | os.PathLike[str]) -> WorldManifest:
    """Read `root/manifest.json` back into a `WorldManifest`."""
    root = Path(root)
    d = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    if d.get("format") != FORMAT_VERSION:
        raise ValueError(f"{root}: world format {d.get('format')} != {FORMAT_VERSION}; rebuild it")
    return WorldManifest(root, WorldConfig.from_dict(d["config"]), d["counts"], tuple(d["files"]))


# --------------------------------------------------------------------------- scenes per split


def split_scenes(cfg: WorldConfig) -> dict[str, list[Scene]]:
    """The scenes of every split; eval splits are drawn first and train avoids their meanings."""
    taken: set[str] = set()
    out: dict[str, list[Scene]] = {}
    for split in ("test", "val", "train"):
        rng = random.Random(f"seechat-mini/{cfg.seed}/{split}")
        scenes: list[Scene] = []
        while len(scenes) < cfg.n_scenes(split):
            scene = generate_scene(rng, cfg.image_size, cfg.max_objects)
            if fingerprint(scene) not in taken:
                scenes.append(scene)
        taken |= {fingerprint(s) for s in scenes}
        out[split] = scenes
    return {split: out[split] for split in SPLITS}


# --------------------------------------------------------------------------- per-scene records


@dataclass
class SceneRecords:
    """Everything one scene contributes to the world; `rows` maps a relative JSONL path to its rows."""

    key: str
    jpeg: bytes
    web_text: str
    meta: dict[str, Any]
    rows: dict[str, list[dict[str, Any]]]


def _jpeg(scene: Scene, quality: int) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 chroma: with 4:2:0 a 64-px scene's colours bleed across object edges.
    render(scene).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def _conversation(turns: list[scene_text.Turn]) -> list[dict[str, str]]:
    conv = []
    for k, (q, a) in enumerate(turns):
        conv += [{"from": "human", "value": f"<image>\n{q}" if k == 0 else q}, {"from": "gpt", "value": a}]
    return conv


def _instruct_turns(scene: Scene, kind: str, rng: random.Random, cfg: WorldConfig) -> list[scene_text.Turn]:
    if kind == "concise":
        return [(scene_text.caption_instruction(rng), scene_text.concise_caption(scene))]
    if kind == "detailed":
        return [(scene_text.caption_instruction(rng, detailed=True), scene_text.detailed_caption(scene, rng))]
    if kind == "dialogue":
        return scene_text.dialogue(scene, rng)
    if kind == "grounding" and (g := scene_text.grounding(scene, rng)) is not None:
        turns = [(scene_text.grounding_instruction(g.expression, rng), g.answer)]
        for _ in range(cfg.grounding_turns - 1):  # more boxes of the same image, objects may repeat
            if (g := scene_text.grounding(scene, rng)) is not None:
                turns.append((scene_text.grounding_instruction(g.expression, rng), g.answer))
        return turns
    # "vqa", or a grounding fallback when no object has a unique expression
    qas = (
        scene_text.vqa_set(scene, rng, cfg.vqa_turns)
        if cfg.vqa_turns > 1
        else [q for q in [scene_text.vqa(scene, rng)] if q]
    )
    return [(qa.question, qa.answer) for qa in qas] or [
        (scene_text.caption_instruction(rng), scene_text.concise_caption(scene))
    ]


def _instruct_rows(scene: Scene, key: str, image: str, cfg: WorldConfig, rng: random.Random) -> list[dict]:
    kinds = rng.choices(INSTRUCT_KINDS, weights=cfg.instruct_weights, k=cfg.instruct_per_image)
    return [
        {
            "id": f"{key}-{n}",
            "kind": kind,
            "image": image,
            "conversations": _conversation(_instruct_turns(scene, kind, rng, cfg)),
        }
        for n, kind in enumerate(kinds)
    ]


def _eval_rows(
    scene: Scene, key: str, image: str, alt: scene_text.AltText, cfg: WorldConfig, rng: random.Random
) -> dict[str, list[dict[str, Any]]]:
    vqa = [
        {"id": f"{key}-{n}", "image": image, "question": q.question, "answer": q.answer, "type": q.type}
        for n, q in enumerate(scene_text.vqa_set(scene, rng, cfg.vqa_per_eval_image))
    ]
    g = scene_text.grounding(scene, rng)
    grounding = (
        []
        if g is None
        else [{"id": key, "image": image, "expression": g.expression, "box": list(g.box), "answer": g.answer}]
    )
    refs = [scene_text.concise_caption(scene)]
    for _ in range(8 * cfg.caption_references):  # varied phrasings, distinct from each other
        if len(refs) >= cfg.caption_references:
            break
        if (c := scene_text.concise_caption(scene, rng)) not in refs:
            refs.append(c)
    captions = [
        {"id": key, "image": image, "references": refs, "detailed": scene_text.detailed_caption(scene, rng)}
    ]
    return {
        "vqa": vqa,
        "grounding": grounding,
        "captions": captions,
        "alt_text": [{"id": key, "image": image, "caption": alt.text, "kind": alt.kind}],
    }


def _lm_rows(scene: Scene, detailed: str, cfg: WorldConfig, rng: random.Random) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [{"text": scene_text.concise_caption(scene, rng)}, {"text": detailed}]
    context = rng.choice(scene_text.DESCRIPTION_CONTEXTS).format(d=detailed)
    qa = scene_text.vqa(scene, rng)
    if qa is not None:
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": context + qa.question},
                    {"role": "assistant", "content": qa.answer},
                ]
            }
        )
    if rng.random() < cfg.lm_dialogue_prob:
        turns = scene_text.dialogue(scene, rng)
        messages = []
        for k, (q, a) in enumerate(turns):
            messages += [
                {"role": "user", "content": context + q if k == 0 else q},
                {"role": "assistant", "content": a},
            ]
        rows.append({"messages": messages})
    n_chat = int(cfg.chitchat_per_scene) + (rng.random() < cfg.chitchat_per_scene % 1)
    for _ in range(n_chat):
        q, a = scene_text.chitchat(rng)
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return rows


def scene_records(scene: Scene, split: str, index: int, cfg: WorldConfig) -> SceneRecords:
    """All files' contributions of scene `index` of `split`; a pure function of its arguments."""
    key = f"{cfg.key_offset(split) + index:09d}"
    image = f"images/{split}/{key}.jpg"
    rng = random.Random(f"seechat-mini/{cfg.seed}/{split}/{index}/text")
    boxed = random.Random()
    boxed.setstate(rng.getstate())  # the same description again, each object followed by its <box>
    caption, detailed = scene_text.concise_caption(scene), scene_text.detailed_caption(scene, rng)
    detailed_boxes = scene_text.detailed_caption(scene, boxed, boxes=True)
    alt = scene_text.alt_text(scene, rng)
    clean = rng.random() < cfg.clean_fraction
    web_text = (
        (scene_text.concise_caption(scene, rng) if rng.random() < 0.8 else detailed) if clean else alt.text
    )
    meta = {
        "split": split,
        "caption": caption,
        "detailed": detailed,
        "detailed_boxes": detailed_boxes,
        "alt_text": alt.text,
        "alt_kind": alt.kind,
        "web_text_is_clean": clean,
        "web_text": web_text,
        "scene": scene.to_dict(),
    }
    rows: dict[str, list[dict[str, Any]]] = {}
    if split in ("train", "val"):
        rows[f"instruct/{split}.jsonl"] = _instruct_rows(scene, key, image, cfg, rng)
    if split in ("val", "test"):
        for name, r in _eval_rows(scene, key, image, alt, cfg, rng).items():
            rows[f"{split}/{name}.jsonl"] = r
    det_rng = random.Random(f"seechat-mini/{cfg.seed}/{split}/{index}/detection")
    det = scene_text.detection(scene)
    question = scene_text.detection_instruction(det_rng)  # the eval request; drawn first, always
    if split in ("train", "val"):
        n = int(cfg.detection_per_image) + (det_rng.random() < cfg.detection_per_image % 1)
        rows[f"instruct/{split}.jsonl"] += [
            {
                "id": f"{key}-d{k}",
                "kind": "detection",
                "image": image,
                "conversations": _conversation([(scene_text.detection_instruction(det_rng), det.answer)]),
            }
            for k in range(n)
        ]
    if split in ("val", "test"):
        objects = [
            {"label": label, "box": list(box)} for label, box in zip(det.labels, det.boxes, strict=True)
        ]
        rows[f"{split}/detection.jsonl"] = [
            {"id": key, "image": image, "question": question, "objects": objects, "answer": det.answer}
        ]
    if split == "train":
        rows["text/lm_corpus.jsonl"] = _lm_rows(scene, detailed, cfg, rng)
        clip_caption = caption if rng.random() < 0.5 else scene_text.concise_caption(scene, rng)
        rows["clip/train.jsonl"] = [{"image": image, "caption": clip_caption}]
    return SceneRecords(key, _jpeg(scene, cfg.jpeg_quality), web_text, meta, rows)


def _records_job(job: tuple[Scene, str, int, WorldConfig]) -> SceneRecords:
    return scene_records(*job)


# --------------------------------------------------------------------------- writing


def _iter_records(cfg: WorldConfig, scenes: list[Scene], split: str, workers: int) -> Iterator[SceneRecords]:
    jobs = ((scene, split, i, cfg) for i, scene in enumerate(scenes))
    if workers <= 1:
        yield from map(_records_job, jobs)
        return
    with get_context("spawn").Pool(workers) as pool:  # spawn: no fork of a torch-holding parent
        yield from pool.imap(_records_job, jobs, chunksize=64)


def _write_split(
    root: Path,
    split: str,
    scenes: list[Scene],
    cfg: WorldConfig,
    workers: int,
    handles: dict[str, io.TextIOBase],
    counts: dict[str, int],
    bar: tqdm,
) -> None:
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    with ShardWriter(
        root / "pairs" / split, max_samples_per_shard=cfg.pairs_per_shard, max_bytes_per_shard=1 << 40
    ) as shards:
        for rec in _iter_records(cfg, scenes, split, workers):
            (root / "images" / split / f"{rec.key}.jpg").write_bytes(rec.jpeg)
            shards.write(rec.key, rec.jpeg, rec.web_text, rec.meta)
            for rel, rows in rec.rows.items():
                if rel not in handles:
                    (root / rel).parent.mkdir(parents=True, exist_ok=True)
                    handles[rel] = open(root / rel, "w", encoding="utf-8")
                handles[rel].writelines(dumps_line(r) for r in rows)
                counts[rel] = counts.get(rel, 0) + len(rows)
            bar.update(1)
    counts[f"pairs/{split}"] = len(scenes)


def _build_into(root: Path, cfg: WorldConfig, workers: int, progress: bool) -> WorldManifest:
    scenes = split_scenes(cfg)
    counts: dict[str, int] = {f"scenes/{s}": len(scenes[s]) for s in SPLITS}
    handles: dict[str, io.TextIOBase] = {}
    try:
        with tqdm(
            total=sum(map(len, scenes.values())), desc="mini world", unit="scene", disable=not progress
        ) as bar:
            for split in SPLITS:
                _write_split(root, split, scenes[split], cfg, workers, handles, counts, bar)
    finally:
        for h in handles.values():
            h.close()
    files = tuple(sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()))
    manifest = WorldManifest(root, cfg, counts, files)
    (root / "manifest.json").write_text(
        json.dumps(manifest.to_dict(), ensure_ascii=False, indent=1), encoding="utf-8"
    )
    return manifest


def build_world(
    out_dir: str | os.PathLike[str],
    cfg: WorldConfig | None = None,
    *,
    force: bool = False,
    workers: int = 1,
    progress: bool = True,
) -> WorldManifest:
    """Write the mini world to `out_dir` and return its manifest.

    If `out_dir` already holds a world built from the same config it is reused (unless `force`).
    The world is built in a sibling temp dir and swapped in by rename, so `out_dir` is never half
    written. `workers` > 1 renders and writes text in a process pool; the output is identical.
    """
    cfg = cfg or WorldConfig()
    out = Path(out_dir)
    if not force and (out / "manifest.json").is_file():
        try:
            existing = load_manifest(out)
        except (ValueError, KeyError, json.JSONDecodeError):
            existing = None
        if existing is not None and existing.config == cfg:
            return existing
    with atomic_directory(out) as tmp:
        manifest = _build_into(tmp, cfg, workers, progress)
    return WorldManifest(out, cfg, manifest.counts, manifest.files)
