"""The mini world on disk: determinism, disjoint splits, webdataset-readable shards, JSONL schemas."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from seechat.data.boxes import parse_box
from seechat.mini.scene_text import QUESTION_TYPES
from seechat.mini.scenes import Scene, fingerprint
from seechat.mini.world import SPLITS, WorldConfig, build_world, load_manifest, split_scenes

CFG = WorldConfig(seed=1, n_train=60, n_val=16, n_test=30, pairs_per_shard=25)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def shard_samples(root: Path, split: str) -> list[dict]:
    urls = sorted(str(p) for p in (root / "pairs" / split).glob("*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return build_world(tmp_path_factory.mktemp("world") / "mini", CFG, progress=False).root


def _content(root: Path) -> dict[str, bytes]:
    """Every file except the shard writer's stats (they hold wall-clock times)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and not p.name.endswith("stats.json")
    }


def test_same_config_gives_identical_bytes(world: Path, tmp_path: Path) -> None:
    again = build_world(tmp_path / "again", CFG, progress=False, workers=2).root
    assert _content(again) == _content(world)
    other = build_world(tmp_path / "other", WorldConfig(seed=2, n_train=5, n_val=2, n_test=2), progress=False)
    assert _content(other.root)["clip/train.jsonl"] != _content(world)["clip/train.jsonl"]


def test_rebuild_is_skipped_for_same_config_and_atomic_when_forced(world: Path) -> None:
    stamp = (world / "manifest.json").stat().st_mtime_ns
    assert build_world(world, CFG, progress=False).counts == load_manifest(world).counts
    assert (world / "manifest.json").stat().st_mtime_ns == stamp
    build_world(world, CFG, progress=False, force=True)
    assert (world / "manifest.json").stat().st_mtime_ns != stamp
    assert not [p for p in world.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_splits_never_share_a_scene() -> None:
    # One object per scene leaves few distinct meanings, so unfiltered draws would collide often.
    scenes = split_scenes(WorldConfig(max_objects=1, n_train=400, n_val=50, n_test=400))
    prints = {split: {fingerprint(s) for s in scenes[split]} for split in SPLITS}
    assert not prints["train"] & prints["test"]
    assert not prints["train"] & prints["val"]
    assert not prints["val"] & prints["test"]


def test_shards_read_with_webdataset(world: Path) -> None:
    keys = set()
    for split in SPLITS:
        samples = shard_samples(world, split)
        assert len(samples) == CFG.n_scenes(split)
        for s in samples:
            assert s["jpg"].size == (CFG.image_size, CFG.image_size) and s["jpg"].mode == "RGB"
            meta = s["json"]
            assert s["__key__"] == meta["key"] and len(meta["key"]) == 9 and meta["key"].isdigit()
            assert meta["split"] == split and s["txt"] == meta["web_text"]
            if not meta["web_text_is_clean"]:
                assert s["txt"] == meta["alt_text"]
            assert meta["alt_kind"] in ("partial", "wrong", "irrelevant", "keywords")
            Scene.from_dict(meta["scene"])
            keys.add(meta["key"])
        assert (world / "images" / split / f"{samples[0]['__key__']}.jpg").is_file()
    assert len(keys) == CFG.n_train + CFG.n_val + CFG.n_test  # keys unique across splits
    assert len(list((world / "pairs" / "train").glob("*.tar"))) == 3  # 60 samples, 25 per shard


def test_shard_images_equal_image_files(world: Path) -> None:
    urls = [str(world / "pairs" / "val" / "00000.tar")]
    for s in wds.WebDataset(urls, shardshuffle=False):
        assert s["jpg"] == (world / "images" / "val" / f"{s['__key__']}.jpg").read_bytes()


def test_instruct_rows_are_llava_conversations(world: Path) -> None:
    for split in ("train", "val"):
        rows = read_jsonl(world / "instruct" / f"{split}.jsonl")
        assert (
            len([r for r in rows if r["kind"] != "detection"]) == CFG.n_scenes(split) * CFG.instruct_per_image
        )
        for r in rows:
            assert r["image"].startswith(f"images/{split}/") and (world / r["image"]).is_file()
            conv = r["conversations"]
            assert len(conv) % 2 == 0 and [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
            assert conv[0]["value"].startswith("<image>\n")
            assert sum(t["value"].count("<image>") for t in conv) == 1
            if r["kind"] == "grounding":
                assert parse_box(conv[1]["value"]) is not None
            if r["kind"] == "detection":
                assert conv[1]["value"].count("<box>") == len(_scene_of(world, r["image"]).objects)
        assert {r["kind"] for r in rows} == {
            "concise",
            "detailed",
            "vqa",
            "dialogue",
            "grounding",
            "detection",
        }


def _scene_of(world: Path, image: str) -> Scene:
    split, key = image.split("/")[1], Path(image).stem
    (sample,) = [s for s in shard_samples(world, split) if s["__key__"] == key]
    return Scene.from_dict(sample["json"]["scene"])


def test_detection_eval_rows_list_every_object_of_the_scene(world: Path) -> None:
    for split in ("val", "test"):
        rows = read_jsonl(world / split / "detection.jsonl")
        assert len(rows) == CFG.n_scenes(split)
        scenes = {s["__key__"]: Scene.from_dict(s["json"]["scene"]) for s in shard_samples(world, split)}
        for r in rows:
            scene = scenes[r["id"]]
            assert sorted(o["label"] for o in r["objects"]) == sorted(o.shape for o in scene.objects)
            boxes = [
                tuple(int(v) for v in b.groups())
                for b in re.finditer(r"\((\d+),(\d+)\),\((\d+),(\d+)\)", r["answer"])
            ]
            assert [tuple(o["box"]) for o in r["objects"]] == [(a, b, c, d) for a, b, c, d in boxes]
            assert r["question"] and "<image>" not in r["question"]


def test_detection_rows_leave_every_other_row_as_it_was(world: Path, tmp_path: Path) -> None:
    """Detection draws from its own random stream: without it, the world is the same minus those rows."""
    from dataclasses import replace

    plain = build_world(tmp_path / "plain", replace(CFG, detection_per_image=0.0), progress=False).root
    a, b = _content(world), _content(plain)
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    dets = {f"{s}/detection.jsonl" for s in ("val", "test")}
    assert set(differ) == {"manifest.json", "instruct/train.jsonl", "instruct/val.jsonl"}
    assert dets <= a.keys() & b.keys()
    for split in ("train", "val"):
        with_det = read_jsonl(world / "instruct" / f"{split}.jsonl")
        assert [r for r in with_det if r["kind"] != "detection"] == read_jsonl(
            plain / "instruct" / f"{split}.jsonl"
        )


def test_eval_files(world: Path) -> None:
    for split in ("val", "test"):
        vqa = read_jsonl(world / split / "vqa.jsonl")
        assert len(vqa) == CFG.n_scenes(split) * CFG.vqa_per_eval_image
        assert all(set(r) >= {"image", "question", "answer", "type"} for r in vqa)
        assert {r["type"] for r in vqa} <= set(QUESTION_TYPES)
        for g in read_jsonl(world / split / "grounding.jsonl"):
            assert tuple(g["box"]) == parse_box(g["answer"]) and all(0 <= v <= 1000 for v in g["box"])
        caps = read_jsonl(world / split / "captions.jsonl")
        assert len(caps) == CFG.n_scenes(split) and all(len(c["references"]) >= 2 for c in caps)
        alt = read_jsonl(world / split / "alt_text.jsonl")
        assert all(r["image"].startswith(f"images/{split}/") and r["caption"] for r in alt)


def test_text_corpora_come_from_train_only(world: Path) -> None:
    train_detailed = {s["json"]["detailed"] for s in shard_samples(world, "train")}
    rows = read_jsonl(world / "text" / "lm_corpus.jsonl")
    for r in rows:
        assert ("text" in r) != ("messages" in r)
        if "messages" in r:
            roles = [m["role"] for m in r["messages"]]
            assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
    long_texts = [r["text"] for r in rows if "text" in r and "背景" in r["text"] and "。" in r["text"][:-1]]
    assert long_texts and set(long_texts) <= train_detailed
    clip = read_jsonl(world / "clip" / "train.jsonl")
    assert len(clip) == CFG.n_train and all(c["image"].startswith("images/train/") for c in clip)


def test_manifest_lists_what_is_on_disk(world: Path) -> None:
    m = load_manifest(world)
    assert m.config == CFG
    on_disk = {p.relative_to(world).as_posix() for p in world.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(m.files) == on_disk
    assert m.counts["pairs/train"] == CFG.n_train and m.counts["test/vqa.jsonl"] > 0


def test_default_sizes_meet_the_brief() -> None:
    cfg = WorldConfig()
    assert cfg.n_test * cfg.vqa_per_eval_image >= 500


def test_vqa_and_grounding_conversations_can_ask_several_questions_about_one_image(tmp_path):
    cfg = WorldConfig(
        n_train=40, n_val=4, n_test=4, vqa_turns=4, grounding_turns=2, instruct_weights=(0, 0, 1, 0, 1)
    )
    rows = [
        json.loads(r)
        for r in (build_world(tmp_path / "w", cfg, progress=False).root / "instruct" / "train.jsonl")
        .read_text(encoding="utf-8")
        .splitlines()
    ]
    vqa = [r for r in rows if r["kind"] == "vqa"]
    assert vqa and max(len(r["conversations"]) for r in vqa) == 8  # 4 questions, 4 answers
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in rows)
    assert all("<image>" not in t["value"] for r in rows for t in r["conversations"][1:])
    assert any(len(r["conversations"]) == 4 for r in rows if r["kind"] == "grounding")


def test_pair_metadata_has_the_description_with_boxes(tmp_path):
    world = build_world(tmp_path / "w", WorldConfig(n_train=8, n_val=2, n_test=2), progress=False).root
    with tarfile.open(next((world / "pairs" / "train").glob("*.tar"))) as tar:
        meta = json.loads(tar.extractfile(next(m for m in tar if m.name.endswith(".json"))).read())
    assert "<box>" in meta["detailed_boxes"]
    assert re.sub(r"<box>[^<]*</box>", "", meta["detailed_boxes"]) == meta["detailed"]
