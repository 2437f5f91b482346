"""The scorer and the whole win-rate experiment on a tiny random Chinese-CLIP, no downloads."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from seechat.data.image_sources import FolderImages
from seechat.data.scorer import ChineseClipScorer
from seechat.eval.winrate import run_winrate

COLOURS = {"红色": (220, 30, 30), "蓝色": (30, 30, 220), "绿色": (30, 180, 30), "黄色": (230, 220, 40)}


def _scene(colour: tuple[int, int, int], box: tuple[int, int, int, int]) -> Image.Image:
    image = Image.new("RGB", (48, 40), (255, 255, 255))
    ImageDraw.Draw(image).ellipse(box, fill=colour)
    return image


@pytest.fixture
def image_dir(tmp_path) -> Path:
    """Four scenes plus one file that has an image extension but is not an image."""
    folder = tmp_path / "images"
    folder.mkdir()
    for k, colour in enumerate(COLOURS.values()):
        _scene(colour, (4 + k, 4, 30 + k, 30)).save(folder / f"img{k}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def caption_files(tmp_path) -> dict[str, Path]:
    names = list(COLOURS)
    alt = [{"image": f"img{k}.png", "caption": f"图中有{c}的圆形"} for k, c in enumerate(names)]
    alt.append({"image": "img0.png", "caption": "重复的一行"})  # duplicate row: first one is used
    alt.append({"image": "broken.png", "caption": "红色"})
    stage1 = [{"image": f"img{k}.png", "caption": "一个圆形"} for k in range(3)]  # img3 missing
    stage1.append({"image": "elsewhere/ghost.png", "caption": "红色"})  # not in the image list
    # same captions as alt_text (absolute-path keys, as some captioners write): exact ties expected
    stage2 = [{"image": str(tmp_path / "images" / r["image"]), "caption": r["caption"]} for r in alt[:4]]
    stage2_lines = _write_jsonl(tmp_path / "stage2.jsonl", stage2).read_text(encoding="utf-8")
    (tmp_path / "stage2.jsonl").write_text(stage2_lines + "{not json\n", encoding="utf-8")
    return {
        "alt_text": _write_jsonl(tmp_path / "alt.jsonl", alt),
        "stage1": _write_jsonl(tmp_path / "stage1.jsonl", stage1),
        "stage2_qformer": tmp_path / "stage2.jsonl",
    }


def test_scorer_embeddings_are_normalised_and_batch_invariant(tiny_clip_dir):
    scorer = ChineseClipScorer.from_pretrained(tiny_clip_dir, device="cpu", dtype=torch.float32, batch_size=2)
    images = [_scene(c, (5, 5, 25, 25)) for c in COLOURS.values()] + [Image.new("L", (20, 50))]
    texts = ["红色的圆形", "蓝色", "图中有一个很大很大的黄色方块在左上角", "绿色", "abc"]
    image_embeds, text_embeds = scorer.embed_images(images), scorer.embed_texts(texts)
    assert image_embeds.shape == text_embeds.shape == (5, 8)
    assert image_embeds.dtype == torch.float32
    torch.testing.assert_close(image_embeds.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(text_embeds.norm(dim=-1), torch.ones(5))
    one_batch = ChineseClipScorer.from_pretrained(tiny_clip_dir, batch_size=16)
    torch.testing.assert_close(one_batch.embed_texts(texts), text_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one_batch.embed_images(images), image_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scorer.score(images, texts), (image_embeds * text_embeds).sum(-1))
    assert scorer.embed_texts([]).shape == (0, 8)


def test_run_winrate_end_to_end_reports_every_problem(tiny_clip_dir, image_dir, caption_files, tmp_path):
    scorer = ChineseClipScorer.from_pretrained(tiny_clip_dir, batch_size=2)
    source = FolderImages(image_dir)
    assert source.ids == ["broken.png", "img0.png", "img1.png", "img2.png", "img3.png"]
    out = tmp_path / "report"
    result = run_winrate(
        source.ids + ["img1.png"],
        source.load,
        caption_files,
        scorer,
        out,
        batch_size=2,
        n_bootstrap=200,
        seed=0,
    )

    kinds = {(p.kind, p.image, p.method) for p in result.problems}
    assert ("unreadable_image", "broken.png", "") in kinds
    assert ("duplicate_caption", "img0.png", "alt_text") in kinds
    assert ("missing_caption", "img3.png", "stage1") in kinds
    assert ("unknown_image", "elsewhere/ghost.png", "stage1") in kinds
    assert ("duplicate_image", "img1.png", "") in kinds
    assert any(p.kind == "bad_caption_row" and p.method == "stage2_qformer" for p in result.problems)

    assert result.image_ids == source.ids  # the duplicate listing is scored once
    assert result.image_status[0] == "unreadable_image" and np.isnan(result.scores[0]).all()
    assert result.n_scored == 4
    assert np.isnan(result.scores[4, 1])  # stage1 has no caption for img3: NaN, cannot win it
    assert result.wins[4, 1] == 0
    # stage2 wrote alt_text's captions (keys as absolute paths): identical scores, split wins
    np.testing.assert_array_equal(result.scores[1:, 0], result.scores[1:, 2])
    np.testing.assert_array_equal(result.wins[1:, 0], result.wins[1:, 2])
    assert result.win_rate.sum() == pytest.approx(1.0)
    assert (result.ci_low <= result.win_rate + 1e-12).all() and (
        result.win_rate <= result.ci_high + 1e-12
    ).all()

    assert set(result.files) == {"report", "chart", "per_image", "problems", "summary"}
    assert all(path.is_file() for path in result.files.values())
    with Image.open(result.files["chart"]) as chart:
        assert chart.format == "PNG" and chart.width > 100
    report = result.files["report"].read_text(encoding="utf-8")
    for needle in ("stage2_qformer", "broken.png", "missing_caption", "unknown_image", "1/k of a win"):
        assert needle in report
    with open(result.files["per_image"], encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == source.ids
    assert rows[0]["status"] == "unreadable_image" and rows[0]["alt_text"] == ""
    summary = json.loads(result.files["summary"].read_text(encoding="utf-8"))
    assert (
        summary["n_images_scored"] == 4 and summary["problems"]["missing_caption"] == 3
    )  # stage1: broken, img3; stage2: broken
