"""`seechat.data.filter`: keep rules, kept sets against directly computed scores, output readable by
webdataset and PairShardDataset, corrupt samples reported, reports written (the verb: tests/cli)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from seechat.cli import main
from seechat.data.filter import HISTOGRAM_FILE, SCORES_FILE, STATS_FILE, KeepRule, filter_shards
from seechat.data.pairs import PairShardDataset
from seechat.data.scorer import ChineseClipScorer
from seechat.data.shards import ShardWriter
from tests.eval.conftest import tiny_clip_dir  # noqa: F401  (fixture: a tiny random ChineseCLIPModel)

COLOURS = {"红": (220, 20, 20), "蓝": (20, 20, 220), "绿": (20, 200, 20), "黄": (230, 220, 20)}
SHAPES = ["圆形", "方块", "三角"]
N_GOOD = 10
CORRUPT = {"bad_trunc": "truncated", "bad_body": "decode"}


def jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (24, 20)) -> bytes:
    out = io.BytesIO()
    image = Image.new("RGB", size, colour)
    image.paste((255 - colour[0], 255 - colour[1], 120), (4, 4, 14, 12))
    image.save(out, "JPEG")
    return out.getvalue()


def good_samples() -> list[tuple[str, bytes, str, dict]]:
    names = list(COLOURS)
    samples = []
    for i in range(N_GOOD):
        colour = names[i % len(names)]
        caption = f"图中有一个{names[(i * 3) % len(names)]}色的{SHAPES[i % len(SHAPES)]}"
        samples.append((f"k{i:03d}", jpeg(COLOURS[colour]), caption, {"caption": f"{colour}色", "source": i}))
    return samples


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two shards of six: ten good pairs plus a truncated JPEG and one whose body does not decode."""
    out = tmp_path_factory.mktemp("filter_in")
    good = good_samples()
    truncated = jpeg((1, 2, 3))[:-40]
    body = bytearray(jpeg((4, 5, 6)))
    body[200:-2] = bytes(len(body) - 202)  # header and end marker intact, entropy-coded data zeroed
    with ShardWriter(out, max_samples_per_shard=6) as writer:
        for key, image, text, meta in good[:5]:
            writer.write(key, image, text, meta)
        writer.write("bad_trunc", truncated, "坏的", {"caption": "坏"})
        for key, image, text, meta in good[5:]:
            writer.write(key, image, text, meta)
        writer.write("bad_body", bytes(body), "坏的", {"caption": "坏"})
    return out


@pytest.fixture(scope="module")
def scorer(tiny_clip_dir: Path) -> ChineseClipScorer:  # noqa: F811
    return ChineseClipScorer.from_pretrained(tiny_clip_dir, batch_size=4)


@pytest.fixture(scope="module")
def direct(scorer: ChineseClipScorer) -> dict[str, float]:
    """Scores of the good pairs computed straight from the images and captions, no shards."""
    good = good_samples()
    images = [Image.open(io.BytesIO(image)).convert("RGB") for _, image, _, _ in good]
    scores = scorer.score(images, [text for _, _, text, _ in good]).tolist()
    return {key: s for (key, _, _, _), s in zip(good, scores, strict=True)}


def shards_of(path: Path) -> str:
    return str(path / "*.tar")


def read_wds(out: Path) -> dict[str, dict]:
    """The filtered output as the webdataset library reads it: key -> {jpg, txt, json}."""
    urls = sorted(str(p) for p in out.glob("*.tar"))
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}


def scores_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / SCORES_FILE).read_text(encoding="utf-8").splitlines()]


# -- keep rules ----------------------------------------------------------------------------------------


def test_keep_rule_needs_exactly_one_valid_criterion() -> None:
    for kwargs in ({}, {"threshold": 0.1, "top_fraction": 0.5}, {"top_fraction": 0.0}, {"top_fraction": 1.5},
                   {"threshold": float("nan")}):  # fmt: skip
        with pytest.raises(ValueError):
            KeepRule(**kwargs)


def test_threshold_is_inclusive_and_never_keeps_corrupt() -> None:
    scores = np.array([0.4, 0.5, np.nan, 0.6], dtype=np.float32)
    keep, used = KeepRule(threshold=0.5).keep_mask(scores)
    assert keep.tolist() == [False, True, False, True] and used == 0.5


def test_top_fraction_keeps_the_rounded_count_ties_by_input_order() -> None:
    scores = np.array([0.3, 0.9, np.nan, 0.5, 0.5, 0.1], dtype=np.float32)  # 5 scored
    keep, used = KeepRule(top_fraction=0.5).keep_mask(scores)  # round(2.5) -> 3 (half up)
    assert keep.tolist() == [False, True, False, True, True, False] and used == pytest.approx(0.5)
    keep, used = KeepRule(top_fraction=0.4).keep_mask(scores)  # 2: the tie at 0.5 goes to the first
    assert keep.tolist() == [False, True, False, True, False, False]
    keep, used = KeepRule(top_fraction=0.05).keep_mask(scores)  # round(0.25) -> nothing kept
    assert not keep.any() and used is None


# -- the filter -----------------------------------------------------------------------------------------


def test_threshold_keeps_exactly_the_pairs_scoring_at_least_t(
    shard_dir: Path, scorer: ChineseClipScorer, direct: dict[str, float], tmp_path: Path
) -> None:
    ordered = sorted(direct.values())
    t = (ordered[4] + ordered[5]) / 2  # halfway between two scores: batching noise cannot flip a pair
    out = tmp_path / "out"
    report = filter_shards(shards_of(shard_dir), out, scorer, KeepRule(threshold=t), max_samples_per_shard=3)

    expected = {k for k, s in direct.items() if s >= t}
    kept = read_wds(out)
    assert set(kept) == expected and report.n_kept == len(expected) == 5
    assert report.n_in == N_GOOD + 2 and report.n_scored == N_GOOD and report.n_corrupt == 2
    assert len(list(out.glob("*.tar"))) == 2  # size-balanced: 3 + 2 samples

    originals = {key: (image, text, meta) for key, image, text, meta in good_samples()}
    for key, sample in kept.items():
        image, text, meta = originals[key]
        assert sample["jpg"] == image and sample["txt"].decode() == text  # copied unchanged
        record = json.loads(sample["json"])
        assert record["caption"] == meta["caption"] and record["source"] == meta["source"]
        assert record["clip_score"] == pytest.approx(direct[key], abs=1e-4)

    rows = scores_rows(out)
    assert [r["key"] for r in rows] == [f"k{i:03d}" for i in range(5)] + ["bad_trunc"] + [
        f"k{i:03d}" for i in range(5, N_GOOD)
    ] + ["bad_body"]
    for r in rows:
        if r["key"] in CORRUPT:
            assert r["score"] is None and not r["kept"] and r["error"]
        else:
            assert r["score"] == pytest.approx(direct[r["key"]], abs=1e-4) and r["kept"] == (
                r["key"] in expected
            )

    stats = json.loads((out / STATS_FILE).read_text())
    assert stats["n_in"] == 12 and stats["n_kept"] == 5 and stats["threshold"] == t
    assert {c["key"] for c in stats["corrupt"]} == set(CORRUPT)
    assert "truncated" in next(c["reason"] for c in stats["corrupt"] if c["key"] == "bad_trunc")
    assert "decode" in next(c["reason"] for c in stats["corrupt"] if c["key"] == "bad_body")
    assert stats["score_quantiles"]["p0"] == pytest.approx(ordered[0], abs=1e-4)
    assert stats["score_quantiles"]["p100"] == pytest.approx(ordered[-1], abs=1e-4)
    assert (out / HISTOGRAM_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    writer_stats = json.loads((out / "stats.json").read_text())  # the shard writer lists them too
    assert writer_stats["failures"] == 2 and writer_stats["samples"] == 5


def test_top_fraction_output_is_readable_by_pair_shard_dataset(
    shard_dir: Path, scorer: ChineseClipScorer, direct: dict[str, float], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    report = filter_shards(
        shards_of(shard_dir), out, scorer, KeepRule(top_fraction=0.3), text_field="json:caption"
    )
    assert report.n_kept == 3  # round(0.3 x 10 scored); the two corrupt samples do not count
    # json:caption scores the metadata caption, not the .txt: recompute directly for that text
    good = good_samples()
    images = [Image.open(io.BytesIO(image)).convert("RGB") for _, image, _, _ in good]
    by_meta = dict(zip(direct, scorer.score(images, [m["caption"] for *_, m in good]).tolist(), strict=True))
    best = sorted(by_meta, key=by_meta.get, reverse=True)[:3]

    dataset = PairShardDataset(shards_of(out), shuffle_buffer=0, shuffle_shards=False, rank=0, world_size=1)
    samples = list(dataset)
    assert sorted(s["key"] for s in samples) == sorted(best)
    assert all(s["image"].mode == "RGB" and "clip_score" in s["meta"] for s in samples)
    assert report.threshold == pytest.approx(min(by_meta[k] for k in best), abs=1e-4)


def test_refuses_existing_output_and_inputs_inside_it(
    shard_dir: Path, scorer: ChineseClipScorer, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FileExistsError):
        filter_shards(shards_of(shard_dir), out, scorer, KeepRule(threshold=0.0))
    with pytest.raises(ValueError, match="inside the output"):
        filter_shards(shards_of(shard_dir), shard_dir, scorer, KeepRule(threshold=0.0), overwrite=True)
    assert list(shard_dir.glob("*.tar"))  # inputs untouched


# -- CLI -------------------------------------------------------------------------------------------------


def test_samples_over_the_size_limit_are_listed_unread(
    shard_dir: Path,
    tiny_clip_dir: Path,  # noqa: F811
    tmp_path: Path,
    capsys,
) -> None:
    out = tmp_path / "out"
    args = [
        "data",
        "filter",
        shards_of(shard_dir),
        str(out),
        "--model",
        str(tiny_clip_dir),
        "--threshold",
        "0",
        "--max-sample-size",
        "500",
        "--no-progress",
    ]  # fmt: skip; every sample here is 700-900 bytes
    assert main(args) == 0
    capsys.readouterr()
    rows = scores_rows(out)
    assert len(rows) == 12 and all(r["error"].startswith("sample too large") for r in rows)
    stats = json.loads((out / STATS_FILE).read_text())
    assert stats["n_corrupt"] == 12 and stats["n_scored"] == 0
