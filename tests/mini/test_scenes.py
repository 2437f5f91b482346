"""Scene generator and Chinese text: determinism, geometry, and answers checked against ground truth.

Answers are checked with an independent resolver that reads a referring phrase word by word, so a
bug in `seechat.mini.scene_text`'s own matching cannot hide itself.
"""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from seechat.data.boxes import normalize_box, parse_box
from seechat.mini import scene_text as T
from seechat.mini.scenes import COLOURS, POSITIONS, SHAPES, Scene, SceneObject, generate_scenes, render

CORNERS = {"左上": (0, 0), "右上": (0, 2), "左下": (2, 0), "右下": (2, 2)}


def resolve(scene: Scene, ref: str) -> list[SceneObject]:
    """Objects a Chinese phrase like "左边的大红色圆形" can mean (colloquial position words)."""

    def fits(o: SceneObject) -> bool:
        for colour in COLOURS:
            if colour in ref and o.colour != colour:
                return False
        for shape in SHAPES:
            if shape in ref and o.shape != shape:
                return False
        for size in ("大", "小"):
            if size in ref and o.size != size:
                return False
        corner = [cell for word, cell in CORNERS.items() if word in ref]
        if corner:
            return (o.row, o.col) == corner[0]
        checks = {
            "中间": (o.row, o.col) == (1, 1),
            "上方": o.row == 0,
            "下方": o.row == 2,
            "左边": o.col == 0,
            "右边": o.col == 2,
        }
        return all(ok for word, ok in checks.items() if word in ref)

    return [o for o in scene.objects if fits(o)]


def the(scene: Scene, ref: str) -> SceneObject:
    found = resolve(scene, ref)
    assert len(found) == 1, f"{ref!r} is ambiguous or empty in {scene.objects}"
    return found[0]


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return generate_scenes(seed=7, n=300)


def test_same_seed_same_scenes_pixels_and_text() -> None:
    a, b = generate_scenes(3, 20), generate_scenes(3, 20)
    assert a == b
    assert all(render(x).tobytes() == render(y).tobytes() for x, y in zip(a, b, strict=True))
    texts = [
        [
            T.detailed_caption(s, random.Random(i)),
            T.dialogue(s, random.Random(i)),
            T.vqa_set(s, random.Random(i), 5),
        ]
        for i, s in enumerate(a)
    ]
    again = [
        [
            T.detailed_caption(s, random.Random(i)),
            T.dialogue(s, random.Random(i)),
            T.vqa_set(s, random.Random(i), 5),
        ]
        for i, s in enumerate(b)
    ]
    assert texts == again
    assert generate_scenes(4, 20) != a


def test_geometry(scenes: list[Scene]) -> None:
    for s in scenes:
        assert 1 <= len(s.objects) <= 4
        cells = [(o.row, o.col) for o in s.objects]
        assert len(set(cells)) == len(cells) and cells == sorted(cells)  # one per cell, reading order
        for o in s.objects:
            x1, y1, x2, y2 = o.bbox
            lo_x, hi_x = o.col * s.image_size // 3, (o.col + 1) * s.image_size // 3
            lo_y, hi_y = o.row * s.image_size // 3, (o.row + 1) * s.image_size // 3
            assert lo_x < x1 < x2 < hi_x and lo_y < y1 < y2 < hi_y  # inside its cell with a margin
            assert o.position in POSITIONS
    assert Scene.from_dict(scenes[0].to_dict()) == scenes[0]


def test_render_paints_objects_in_their_colour(scenes: list[Scene]) -> None:
    for s in scenes[:50]:
        img = render(s)
        assert img.mode == "RGB" and img.size == (64, 64)
        px = np.asarray(img).astype(int)  # (H, W, 3)
        for o in s.objects:
            cx, cy = (o.bbox[0] + o.bbox[2]) // 2, (o.bbox[1] + o.bbox[3]) // 2
            assert np.abs(px[cy, cx] - np.array(o.rgb)).max() <= 12, (o, px[cy, cx])
        corner_bg = px[0, 0]  # no object touches the image border
        assert np.abs(corner_bg - np.array(s.background_rgb)).max() <= 20


def _expected(scene: Scene, qa: T.QA) -> str:
    if qa.type == "count":
        return str(len(resolve(scene, qa.refs[0])))
    if qa.type == "existence":
        return "是" if resolve(scene, qa.refs[0]) else "否"
    if qa.type == "relation":
        a, b = the(scene, qa.refs[0]), the(scene, qa.refs[1])
        truth = {"左边": a.col < b.col, "右边": a.col > b.col, "上面": a.row < b.row, "下面": a.row > b.row}
        assert truth[qa.answer], (qa, a, b)
        assert ("左边还是右边" in qa.question) == (qa.answer in ("左边", "右边"))
        return qa.answer
    o = the(scene, qa.refs[0])
    return {"colour": o.colour, "shape": o.shape, "size": o.size, "position": o.position}[qa.type]


def test_every_vqa_answer_matches_the_scene(scenes: list[Scene]) -> None:
    seen_types = set()
    for i, s in enumerate(scenes):
        rng = random.Random(i)
        for qtype in T.QUESTION_TYPES:
            qa = T.vqa(s, rng, qtype)
            if qa is None:
                continue
            seen_types.add(qa.type)
            assert all(ref in qa.question for ref in qa.refs)
            assert qa.answer == _expected(s, qa), (qa, s.objects)
    assert seen_types == set(T.QUESTION_TYPES)


def test_referring_expressions_and_grounding_are_unique(scenes: list[Scene]) -> None:
    for i, s in enumerate(scenes):
        for j in range(len(s.objects)):
            for ref in T.referring_expressions(s, j):
                assert the(s, ref.text) is s.objects[j], ref
        g = T.grounding(s, random.Random(i))
        if g is not None:
            assert g.box == normalize_box(the(s, g.expression).bbox, s.image_size)
            assert parse_box(g.answer) == g.box


def test_captions_name_every_object_and_vary(scenes: list[Scene]) -> None:
    frames, intros = set(), set()
    for i, s in enumerate(scenes[:100]):
        rng = random.Random(i)
        canonical = T.concise_caption(s)
        for o in s.objects:
            assert o.colour in canonical and o.shape in canonical
        varied = T.concise_caption(s, rng)
        core = canonical if canonical in varied else canonical.replace("的", "")
        frames.add(varied.replace(core, "{c}").replace(s.background, "{bg}"))
        detailed = T.detailed_caption(s, rng)
        assert all(f"{o.size}的{o.colour}{o.shape}" in detailed for o in s.objects)
        intros.add(re.sub(r"[一两三四]", "N", detailed.split("。")[0].replace(s.background, "{bg}")))
    assert len(frames) >= 6 and len(intros) >= 4, (frames, intros)


def test_one_object_intro_says_only_one_once(scenes: list[Scene]) -> None:
    singles = [s for s in scenes if len(s.objects) == 1]
    intros = {T.detailed_caption(s, random.Random(i)).split("。")[0] for s in singles for i in range(8)}
    assert len(singles) >= 10 and not any("只只" in x for x in intros), intros
    assert any("上面只有一个图形" in x for x in intros) and any("画面中只有一个图形" in x for x in intros)


def test_alt_text_kinds(scenes: list[Scene]) -> None:
    rng = random.Random(0)
    for s in scenes[:100]:
        true_pairs = {(o.colour, o.shape) for o in s.objects}
        wrong = T.alt_text(s, rng, "wrong").text
        assert not any(f"{c}{sh}" in wrong.replace("的", "") for c, sh in true_pairs)
        partial = T.alt_text(s, rng, "partial").text.replace("的", "")
        assert any(f"{c}{sh}" in partial for c, sh in true_pairs)
        junk = T.alt_text(s, rng, "irrelevant").text
        assert not any(w in junk for w in (*COLOURS, *SHAPES))
    assert {T.alt_text(scenes[0], rng).kind for _ in range(50)} == set(T.ALT_KINDS)


def test_dialogues_refer_back(scenes: list[Scene]) -> None:
    for i, s in enumerate(scenes[:100]):
        turns = T.dialogue(s, random.Random(i))
        assert 2 <= len(turns) <= 4
        assert all(q and a for q, a in turns)
        assert any(w in q for q, _ in turns[1:] for w in ("它", "那", "有几个", "其中")), turns


def test_chitchat_facts() -> None:
    rng = random.Random(0)
    pairs = [T.chitchat(rng) for _ in range(300)]
    for q, a in pairs:
        if "混" in q or "加" in q and "色" in q:
            colours = {c for c in COLOURS if c in q}
            mix = {
                frozenset({"红色", "黄色"}): "橙色",
                frozenset({"蓝色", "黄色"}): "绿色",
                frozenset({"红色", "蓝色"}): "紫色",
            }
            assert a == mix[frozenset(colours)], (q, a)
    assert len(set(pairs)) > 30
