"""Mini experts: both train on fresh scenes, load with the Auto* classes offline, plug into the
stitched model, and are reused when already done; the shipped pair matches today's recipes and world
generators; the contrastive, box and reading pieces are checked in isolation."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel, AutoProcessor, AutoTokenizer, ChineseCLIPModel

from seechat.config import BridgeConfig, LMConfig, ModelConfig, VisionConfig
from seechat.data.char_tokenizer import build_char_tokenizer
from seechat.data.collate import collate
from seechat.data.jsonl import read_jsonl
from seechat.data.scorer import ChineseClipScorer
from seechat.mini import scene_text
from seechat.mini.clip_expert import (
    clip_batch,
    clip_loss,
    normalize_pixels,
    patch_areas,
    patch_box_targets,
    patch_weights,
)
from seechat.mini.expert_training import world_texts
from seechat.mini.experts import (
    SHIPPED,
    ClipRecipe,
    LMRecipe,
    evaluate_clip,
    evaluate_lm,
    shipped_experts,
    train_experts,
    train_mini_clip,
    train_mini_lm,
)
from seechat.mini.fresh import fresh_scenes, held_out_meanings, step_batches, text_fingerprint
from seechat.mini.lm_expert import IGNORE, encode_row, lm_batch, reading_row, text_row
from seechat.mini.scenes import fingerprint
from seechat.mini.world import WorldConfig, build_world
from seechat.model import build

WORLD = WorldConfig(n_train=64, n_val=16, n_test=16)
CLIP = ClipRecipe(
    vision_hidden=32,
    vision_layers=2,
    text_hidden=32,
    text_layers=1,
    projection_dim=32,
    steps=12,
    batch_size=16,
    lr=3e-3,
    warmup_steps=2,
    log_every=1,
)
LM = LMRecipe(
    hidden=32,
    layers=1,
    heads=2,
    kv_heads=1,
    intermediate=64,
    steps=12,
    batch_size=8,
    warmup_steps=2,
    log_every=1,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return build_world(tmp_path_factory.mktemp("world") / "mini", WORLD, progress=False).root


@pytest.fixture(scope="module")
def trained(world: Path, tmp_path_factory) -> dict[str, Path]:
    paths = train_experts(tmp_path_factory.mktemp("experts"), CLIP, LM, threads=1)
    return {"clip": paths.clip, "lm": paths.lm, "tok": paths.lm_tokenizer}


def _losses(directory: Path) -> list[float]:
    return [row["loss"] for row in read_jsonl(directory / "metrics.jsonl")]


def _loss_drops(losses: list[float]) -> bool:
    return sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


# --------------------------------------------------------------------------- mini CLIP


def test_clip_trains_and_writes_its_records(trained):
    d = trained["clip"]
    assert _loss_drops(_losses(d)), _losses(d)
    assert (d / "loss.png").stat().st_size > 0
    done = json.loads((d / "done.json").read_text())
    assert done["recipe"]["steps"] == CLIP.steps and done["world_fingerprint"] == text_fingerprint()
    assert not list(d.parent.glob(".clip.tmp-*"))  # built aside, renamed into place


def test_clip_folder_loads_with_auto_classes(trained, world):
    d = trained["clip"]
    assert type(AutoModel.from_pretrained(d)).__name__ == "ChineseCLIPModel"
    assert type(AutoProcessor.from_pretrained(d)).__name__ == "ChineseCLIPProcessor"
    tokenizer = AutoTokenizer.from_pretrained(d)
    assert tokenizer.tokenize("左上角有一个大的红色圆形。") == list("左上角有一个大的红色圆形。")
    all_ids = {i for ids in tokenizer(list(world_texts(world)))["input_ids"] for i in ids}
    assert tokenizer.unk_token_id not in all_ids  # every character of the world is in vocab.txt
    image = Image.open(world / "images" / "val" / f"{WORLD.n_train:09d}.jpg")
    pixels = AutoImageProcessor.from_pretrained(d)(images=[image], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 64, 64)
    raw = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8
    torch.testing.assert_close(pixels, normalize_pixels(raw))  # training's fast path = the processor


def test_clip_is_the_relevance_scorer(trained, world):
    scorer = ChineseClipScorer.from_pretrained(trained["clip"])
    image = Image.open(world / "images" / "val" / f"{WORLD.n_train:09d}.jpg")
    scores = scorer.score([image, image], ["一个红色的圆形", "两个蓝色的三角形"])
    assert scores.shape == (2,) and bool(((scores >= -1) & (scores <= 1)).all())


def test_evaluate_clip_reports_retrieval_and_region_attributes(trained, world):
    result = evaluate_clip(trained["clip"], world, threads=1)
    for key in (
        "i2t_top1",
        "t2i_top1",
        "i2t_top1_detailed",
        "t2i_top1_detailed",
        "region_shape",
        "region_colour",
        "region_size",
        "box_probe_acc@0.5",
    ):
        assert 0.0 <= result[key] <= 1.0, key
    assert result["n_images"] == WORLD.n_val


# --------------------------------------------------------------------------- mini LM


def test_lm_trains_with_its_own_tokenizer_folder(trained, world):
    assert _loss_drops(_losses(trained["lm"])), _losses(trained["lm"])
    assert not (trained["lm"] / "tokenizer.json").exists()  # never next to the Qwen2 config.json
    tokenizer = AutoTokenizer.from_pretrained(trained["tok"])
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    all_ids = {i for ids in tokenizer(list(world_texts(world)))["input_ids"] for i in ids}
    assert tokenizer.unk_token_id not in all_ids
    model = AutoModel.from_pretrained(trained["lm"])
    assert model.config.model_type == "qwen2" and model.config.vocab_size == len(tokenizer)


def test_evaluate_lm_reports_perplexities(trained, world):
    result = evaluate_lm(trained["lm"], world, threads=1)
    vocab = len(AutoTokenizer.from_pretrained(trained["tok"]))
    assert 1.0 < result["val_ppl"] < vocab and 1.0 < result["qa_answer_ppl"]  # trained: better than uniform
    assert 0.0 <= result["qa_exact"] <= 1.0 and result["n_qa"] > 0
    assert set(result["qa_exact_by_type"]) == {*scene_text.QUESTION_TYPES, "grounding"}


def test_lm_exam_curve_is_logged_along_the_way_and_leaves_the_weights_alone(trained, tmp_path):
    """`exam_every` writes the reading exam into metrics.jsonl at those steps and the last; the
    weights are those of the same recipe trained without it (the exam only reads)."""
    out = train_mini_lm(tmp_path / "lm", LM, threads=1, exam_every=5)
    rows = read_jsonl(out / "metrics.jsonl")
    examined = [r["step"] for r in rows if "exam" in r]
    assert examined == [0, 5, 10, LM.steps - 1]
    last = rows[-1]
    assert 0.0 <= last["exam"] <= 1.0
    assert set(last["exam_by_type"]) == {*scene_text.QUESTION_TYPES, "grounding"}
    assert (out / "exam.png").is_file() and not (trained["lm"] / "exam.png").exists()
    with_exam = load_file(str(out / "model.safetensors"))
    without = load_file(str(trained["lm"] / "model.safetensors"))
    assert with_exam.keys() == without.keys()
    assert all(torch.equal(with_exam[k], without[k]) for k in with_exam)
    with pytest.raises(ValueError, match="multiple of log_every"):
        train_mini_lm(tmp_path / "bad", dataclasses.replace(LM, log_every=2), exam_every=3)


# --------------------------------------------------------------------------- stitched


@pytest.mark.parametrize("bridge", ["mlp2x_gelu", "qformer"])
def test_experts_plug_into_the_stitched_model(trained, world, bridge):
    cfg = ModelConfig(
        vision=VisionConfig(path=str(trained["clip"])),
        lm=LMConfig(path=str(trained["lm"]), tokenizer_path=str(trained["tok"])),
        bridge=BridgeConfig(type=bridge, num_queries=4, num_heads=2),
    )
    model, proc = build(cfg)
    assert model.vision_tower.num_features == 64  # an 8x8 grid of patches, CLS dropped
    image = Image.open(world / "images" / "val" / f"{WORLD.n_train:09d}.jpg")
    conv = [{"role": "user", "content": "<image>\n图中有几个图形？"}, {"role": "assistant", "content": "2"}]
    enc = proc.encode_conversation(conv, [image])
    out = model(**collate([enc], proc.tokenizer.pad_token_id))
    assert torch.isfinite(out.loss)


# --------------------------------------------------------------------------- skip-if-done, determinism


def test_done_output_is_reused_and_force_or_a_new_recipe_retrains(trained, world, tmp_path):
    d = train_mini_lm(tmp_path / "lm", LM, threads=1)
    stamp = (d / "model.safetensors").stat().st_mtime_ns
    assert train_mini_lm(d, LM, threads=1) == d
    assert (d / "model.safetensors").stat().st_mtime_ns == stamp  # skipped
    train_mini_lm(d, LM, force=True, threads=1)
    assert (d / "model.safetensors").stat().st_mtime_ns != stamp
    stamp = (d / "model.safetensors").stat().st_mtime_ns
    train_mini_lm(d, LMRecipe(**{**LM.__dict__, "seed": 1}), threads=1)
    assert (d / "model.safetensors").stat().st_mtime_ns != stamp
    assert json.loads((d / "done.json").read_text())["recipe"]["seed"] == 1


def test_same_seed_gives_the_same_clip(trained, world, tmp_path):
    again = train_mini_clip(tmp_path / "clip", CLIP, threads=1, workers=2)  # batches do not depend on workers
    assert _losses(again) == pytest.approx(_losses(trained["clip"]), rel=1e-5)
    a, b = ChineseCLIPModel.from_pretrained(again), ChineseCLIPModel.from_pretrained(trained["clip"])
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- pieces


def test_clip_loss_is_clips_symmetric_cross_entropy_on_one_to_one_batches():
    logits = torch.randn(5, 5)
    expected = (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))) / 2
    torch.testing.assert_close(clip_loss(logits, torch.eye(5, dtype=torch.bool)), expected)


def test_clip_loss_does_not_push_apart_images_that_share_a_caption():
    logits = torch.zeros(2, 2, requires_grad=True)  # the same caption for two images, scored equally
    clip_loss(logits, torch.ones(2, 2, dtype=torch.bool)).backward()
    assert float(logits.grad.abs().max()) < 1e-7  # already optimal: both images are right
    logits.grad = None
    clip_loss(logits, torch.eye(2, dtype=torch.bool)).backward()
    assert float(logits.grad.abs().max()) > 0.1  # one-to-one targets would separate them


def test_patch_weights_cover_the_box():
    w = patch_weights((2, 23, 18, 39), image_size=64, patch_size=8).view(8, 8)  # 16 x 16 px box
    assert float(w.sum()) == pytest.approx(1.0)
    assert set(torch.nonzero(w)[:, 0].tolist()) == {2, 3, 4} and set(torch.nonzero(w)[:, 1].tolist()) == {
        0,
        1,
        2,
    }
    assert float(w[3, 0]) == pytest.approx(6 * 8 / 256)  # 6 px of x in patch 0, all 8 px of y in patch row 3


def test_patch_box_targets_name_the_object_covering_most_of_each_patch():
    scene = fresh_scenes(random.Random(3), 1)[0]
    boxes, has = patch_box_targets(scene, 8)
    for o in scene.objects:
        p = int(patch_areas(o.bbox, 64, 8).argmax())
        assert bool(has[p]) and boxes[p].tolist() == pytest.approx([v / 64 for v in o.bbox])
    assert int(has.sum()) < 64  # background patches carry no box


# --------------------------------------------------------------------------- fresh data


def test_fresh_batches_are_a_function_of_the_step_and_never_repeat_or_touch_held_out_scenes():
    a = list(step_batches(lambda step: clip_batch(CLIP, step), 3))
    b = [clip_batch(CLIP, step) for step in range(3)]
    assert all(torch.equal(x[0], y[0]) and x[1].texts == y[1].texts for x, y in zip(a, b, strict=True))
    scenes = [s for step in range(20) for s in fresh_scenes(random.Random(step), 64)]
    assert not {fingerprint(s) for s in scenes} & held_out_meanings()


def test_lm_rows_encode_as_the_tokenizer_does_and_supervise_only_replies():
    tokenizer = build_char_tokenizer(extra_chars=scene_text.charset())
    rng = random.Random(0)
    for scene in fresh_scenes(rng, 30):
        chat, plain = reading_row(scene, rng, 0.5, 3), text_row(scene, rng)
        rendered = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in chat], tokenize=False)
        ids, labels = encode_row(chat, tokenizer)
        assert (
            ids == tokenizer.encode(rendered, add_special_tokens=False) and tokenizer.unk_token_id not in ids
        )
        replies = "".join(c + "<|im_end|>" for r, c in chat if r == "assistant")
        assert tokenizer.decode([t for t in labels if t != IGNORE]) == replies
        if isinstance(plain, str):  # text rows (not small talk): every token supervised
            ids, labels = encode_row(plain, tokenizer)
            assert ids == labels and ids[-1] == tokenizer.eos_token_id
    ids, labels = lm_batch(LM, tokenizer, 0)
    assert ids.shape == labels.shape and ids.shape[0] == LM.batch_size


def test_the_world_writes_only_characters_of_the_charset(world):
    charset = set(scene_text.charset())
    assert {c for t in world_texts(world) for c in t} <= charset


# --------------------------------------------------------------------------- the shipped experts


def test_shipped_experts_were_made_by_todays_recipes_and_world_generators():
    """Fails when a recipe default or what the world draws and writes changes while the shipped
    weights still record the old ones: retrain them with `seechat mini experts` and replace them."""
    for name, recipe in (("clip", ClipRecipe()), ("lm", LMRecipe())):
        done = json.loads((SHIPPED / name / "done.json").read_text())
        assert done["recipe"] == json.loads(json.dumps(dataclasses.asdict(recipe))), name
        assert done["world_fingerprint"] == text_fingerprint(), name
    size = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert size <= 25 * 2**20  # the budget for both experts


def test_shipped_experts_load_and_read_the_world(world):
    paths = shipped_experts()
    assert type(AutoModel.from_pretrained(paths.clip)).__name__ == "ChineseCLIPModel"
    tokenizer = AutoTokenizer.from_pretrained(paths.lm_tokenizer)
    assert set(scene_text.charset()) <= set(tokenizer.get_vocab())
    assert set(scene_text.charset()) - {" ", "\n", "\t"} <= set(
        AutoTokenizer.from_pretrained(paths.clip).get_vocab()
    )
    for name in ("clip", "lm"):
        assert json.loads((SHIPPED / name / "eval.json").read_text())  # their held-out scores ship with them
