"""Chinese text about mini-world scenes: captions, noisy web alt-text, VQA, dialogues, grounding,
detection lists.

Everything here is a pure function of a `Scene` (ground truth) and a `random.Random` that picks
among several phrasings, so the same seed always gives the same text. No image is looked at.
This module is not the scene generator (`seechat.mini.scenes`) and writes no files
(`seechat.mini.world` assembles the datasets).

Canonical short answers (VQA `answer` fields and single-fact dialogue replies):

=============  ===============================================================
type           answer
=============  ===============================================================
``count``      Arabic digits: "0" … "4"
``colour``     a colour name: 红色 绿色 蓝色 黄色 紫色 橙色 黑色
``shape``      a shape name: 圆形 正方形 三角形 长方形 菱形 星形
``existence``  "是" or "否"
``position``   a 3x3 grid name: 左上 上方 右上 左边 中间 右边 左下 下方 右下
``relation``   "左边" "右边" (columns differ) or "上面" "下面" (rows differ)
``size``       "大" or "小"
=============  ===============================================================

Referring expressions are unique in their scene. Position words inside an expression are read
colloquially: 左上角/右上角/左下角/右下角/中间 name one grid cell, 左边/右边 mean "in the left/right
column" and 上方/下方 "in the top/bottom row"; an expression is only used when exactly one object
fits it. (A *position answer* is always the exact grid cell name, e.g. "左边" = middle-left cell.)

Boxes are written ``<box>(x1,y1),(x2,y2)</box>`` with integers in 0..1000, relative to the image
width/height (Qwen-VL style); the format lives in `seechat.data.boxes`.
"""

from __future__ import annotations

import random
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import combinations

from seechat.data.boxes import format_box, normalize_box
from seechat.mini.scenes import COLOURS, SHAPES, Scene, SceneObject

QUESTION_TYPES: tuple[str, ...] = ("count", "colour", "shape", "existence", "position", "relation", "size")
ALT_KINDS: tuple[str, ...] = ("partial", "wrong", "irrelevant", "keywords")
CN_NUMBER = {1: "一", 2: "两", 3: "三", 4: "四", 5: "五", 6: "六", 7: "七", 8: "八", 9: "九"}

Turn = tuple[str, str]  # (user, assistant)

# Colloquial position modifiers for referring expressions: word -> does a (row, col) cell fit it?
POSITION_MODIFIERS: dict[str, Callable[[int, int], bool]] = {
    "左上角": lambda r, c: (r, c) == (0, 0),
    "右上角": lambda r, c: (r, c) == (0, 2),
    "左下角": lambda r, c: (r, c) == (2, 0),
    "右下角": lambda r, c: (r, c) == (2, 2),
    "中间": lambda r, c: (r, c) == (1, 1),
    "上方": lambda r, c: r == 0,
    "下方": lambda r, c: r == 2,
    "左边": lambda r, c: c == 0,
    "右边": lambda r, c: c == 2,
}
# Grid name -> how a detailed caption says "at that place".
LOCATIVE = {
    "左上": "左上角",
    "上方": "上方",
    "右上": "右上角",
    "左边": "左边",
    "中间": "中间",
    "右边": "右边",
    "左下": "左下角",
    "下方": "下方",
    "右下": "右下角",
}


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class QA:
    """One VQA item; `refs` are the referring phrases it uses (for checking answers)."""

    question: str
    answer: str
    type: str  # one of QUESTION_TYPES
    refs: tuple[str, ...] = ()


@dataclass(frozen=True)
class AltText:
    text: str
    kind: str  # one of ALT_KINDS


@dataclass(frozen=True)
class Grounding:
    expression: str  # unique referring expression, e.g. "左边的蓝色三角形"
    index: int  # which object of scene.objects
    box: tuple[int, int, int, int]  # (x1, y1, x2, y2) in 0..1000
    answer: str  # format_box(...) text


@dataclass(frozen=True)
class RefExpr:
    text: str
    index: int  # the object it picks out
    uses: frozenset[str]  # subset of {"shape", "colour", "size", "position"}


# --------------------------------------------------------------------------- phrases


def _join(items: Sequence[str]) -> str:
    """["a"] -> "a"; ["a", "b"] -> "a和b"; ["a", "b", "c"] -> "a、b和c"."""
    items = list(items)
    return items[0] if len(items) == 1 else "、".join(items[:-1]) + "和" + items[-1]


def phrase(
    shape: str | None = None, colour: str | None = None, size: str | None = None, position: str | None = None
) -> str:
    """A noun phrase for an attribute set: "红色的圆形", "大的红色圆形", "左边的圆形", "红色的图形"."""
    noun = shape or "图形"
    core = f"{colour}{noun}" if colour else noun
    if size:
        core = f"{size}的{core}" if colour else f"{size}{core}"
    elif colour and not position:
        core = f"{colour}的{noun}"
    return f"{position}的{core}" if position else core


def _fits(obj: SceneObject, attrs: dict[str, str]) -> bool:
    return (
        attrs.get("shape", obj.shape) == obj.shape
        and attrs.get("colour", obj.colour) == obj.colour
        and attrs.get("size", obj.size) == obj.size
        and ("position" not in attrs or POSITION_MODIFIERS[attrs["position"]](obj.row, obj.col))
    )


def matching(scene: Scene, attrs: dict[str, str]) -> list[int]:
    """Indices of objects that fit every attribute in `attrs` (keys: shape/colour/size/position)."""
    return [i for i, o in enumerate(scene.objects) if _fits(o, attrs)]


_BASE_ATTRS = (("shape",), ("colour",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape"))


def referring_expressions(scene: Scene, index: int) -> list[RefExpr]:
    """Every expression (from a fixed family) that picks out exactly object `index`."""
    obj = scene.objects[index]
    values = {"shape": obj.shape, "colour": obj.colour, "size": obj.size}
    candidates: list[dict[str, str]] = [{k: values[k] for k in keys} for keys in _BASE_ATTRS]
    for word, fits in POSITION_MODIFIERS.items():
        if fits(obj.row, obj.col):
            candidates += [
                {"position": word},
                {"position": word, "shape": obj.shape},
                {"position": word, "colour": obj.colour, "shape": obj.shape},
            ]
    return [
        RefExpr(phrase(**attrs), index, frozenset(attrs))
        for attrs in candidates
        if matching(scene, attrs) == [index]
    ]


def _pick_ref(scene: Scene, index: int, rng: random.Random, without: str | None = None) -> RefExpr | None:
    refs = [r for r in referring_expressions(scene, index) if without not in r.uses]
    return rng.choice(refs) if refs else None


# --------------------------------------------------------------------------- captions

CONCISE_FRAMES = (
    "{c}",
    "图中有{c}。",
    "画面里是{c}。",
    "这张图片上有{c}。",
    "图片展示了{c}。",
    "可以看到{c}。",
    "一张画着{c}的图片。",
    "{bg}的背景上有{c}。",
)
DETAILED_INTROS = (
    "这张图片的背景是{bg}，上面一共有{n}个图形。",
    "图片是{bg}背景，画面中有{n}个图形。",
    "在{bg}的背景上，可以看到{n}个图形。",
    "这是一张{bg}背景的图片，里面画了{n}个图形。",
)
DETAILED_OBJECTS = (
    "{pos}有一个{size}的{colour}{shape}。",
    "在{pos}，有一个{size}的{colour}{shape}。",
    "{pos}画着一个{size}的{colour}{shape}。",
    "{pos}是一个{size}的{colour}{shape}。",
)
RELATION_SENTENCES = ("{a}在{b}的{rel}。", "其中，{a}位于{b}的{rel}。", "可以看出{a}在{b}的{rel}。")


def _groups(scene: Scene) -> list[tuple[str, str, int]]:
    """(colour, shape, count) groups in reading order of their first object."""
    counts: dict[tuple[str, str], int] = {}
    for o in scene.objects:
        counts[(o.colour, o.shape)] = counts.get((o.colour, o.shape), 0) + 1
    return [(c, s, n) for (c, s), n in counts.items()]


def _core(groups: Sequence[tuple[str, str, int]], with_de: bool = True) -> str:
    de = "的" if with_de else ""
    return _join([f"{CN_NUMBER[n]}个{c}{de}{s}" for c, s, n in groups])


def concise_caption(scene: Scene, rng: random.Random | None = None) -> str:
    """Without `rng`: the canonical caption, e.g. "一个红色的圆形和两个蓝色的三角形" (no final
    punctuation; groups of same colour+shape in reading order). With `rng`: a varied phrasing."""
    if rng is None:
        return _core(_groups(scene))
    core = _core(_groups(scene), with_de=rng.random() < 0.7)
    return rng.choice(CONCISE_FRAMES).format(c=core, bg=scene.background)


def _relation(a: SceneObject, b: SceneObject, rng: random.Random) -> str | None:
    """Where a is relative to b along one axis where they differ: 左边/右边/上面/下面, or None."""
    options = []
    if a.col != b.col:
        options.append("左边" if a.col < b.col else "右边")
    if a.row != b.row:
        options.append("上面" if a.row < b.row else "下面")
    return rng.choice(options) if options else None


def detailed_caption(scene: Scene, rng: random.Random, boxes: bool = False) -> str:
    """Background, every object with position and size, and one spatial relation when possible.
    `boxes=True` appends each object's ``<box>`` right after its phrase (the random choices, and so
    every other word, stay the same), which is how the mini LM learns to read and copy boxes."""
    n = len(scene.objects)
    parts = [rng.choice(DETAILED_INTROS).format(bg=scene.background, n=CN_NUMBER[n])]
    if n == 1:
        one = "一共有一个" if "一共有一个" in parts[0] else "有一个"  # never both: "只只有"
        parts[0] = parts[0].replace(one, "只有一个", 1)
    for o in scene.objects:
        sentence = rng.choice(DETAILED_OBJECTS).format(
            pos=LOCATIVE[o.position], size=o.size, colour=o.colour, shape=o.shape
        )
        parts.append(sentence[:-1] + format_box(o.bbox, scene.image_size) + "。" if boxes else sentence)
    pairs = list(combinations(range(n), 2))
    rng.shuffle(pairs)
    for i, j in pairs:
        ra, rb = _pick_ref(scene, i, rng, "position"), _pick_ref(scene, j, rng, "position")
        if ra and rb:
            rel = _relation(scene.objects[i], scene.objects[j], rng)
            parts.append(rng.choice(RELATION_SENTENCES).format(a=ra.text, b=rb.text, rel=rel))
            break
    return "".join(parts)


CONCISE_INSTRUCTIONS = (
    "请用一句话描述这张图片。",
    "简要描述一下图片内容。",
    "图里有什么？",
    "这张图片画了什么？",
    "给这张图配一句简短的说明。",
    "用简短的话说说图中的内容。",
)
DETAILED_INSTRUCTIONS = (
    "请详细描述这张图片。",
    "详细说说图里每个图形的位置和大小。",
    "请仔细描述图片中的内容，包括位置和大小。",
    "描述一下这张图片，越详细越好。",
)
# How a reading exercise hands the LM a scene's description before asking about it.
DESCRIPTION_CONTEXTS = ("图片描述：{d}\n", "下面是一张图片的描述：{d}\n请回答：", "{d}\n根据上面的描述回答：")
GROUNDING_INSTRUCTIONS = (
    "请给出{e}的位置（坐标框）。",
    "{e}在哪里？请用坐标框回答。",
    "找到{e}，输出它的边界框。",
    "请框出{e}。",
    "给出{e}的边界框坐标。",
)


def caption_instruction(rng: random.Random, detailed: bool = False) -> str:
    """A user request for a concise (or detailed) caption."""
    return rng.choice(DETAILED_INSTRUCTIONS if detailed else CONCISE_INSTRUCTIONS)


def grounding_instruction(expression: str, rng: random.Random) -> str:
    """A user request for the box of `expression`; always mentions a box, unlike position VQA."""
    return rng.choice(GROUNDING_INSTRUCTIONS).format(e=expression)


# --------------------------------------------------------------------------- web alt-text

WEB_JUNK = (
    "高清壁纸 免费下载",
    "点击查看更多图片",
    "图片来源网络，侵删",
    "本站素材仅供学习交流",
    "【热门】精选图片大全",
    "微信图片_20190312",
    "转发收藏",
    "默认标题",
    "未命名-1.jpg",
    "正品保障 包邮",
    "点击进入下一页",
    "image",
    "banner",
    "logo设计 矢量素材",
    "IMG_2023_0815",
    "更多精彩内容请关注我们",
    "版权所有 翻版必究",
    "加载中…",
    "缩略图",
    "PPT模板 免费",
)
WEB_WORDS = ("图片", "素材", "几何", "图案", "设计", "免费", "png", "矢量图", "背景", "简约", "卡通", "高清")
WEB_FRAMES = ("{c}", "{c} - {junk}", "【{c}】{junk}", "{c}图片", "{c}_{junk}", "图为{c}")


def _absent_pairs(scene: Scene, rng: random.Random, n: int) -> list[tuple[str, str]]:
    """`n` distinct (colour, shape) pairs that no object in the scene has."""
    taken = {(o.colour, o.shape) for o in scene.objects}
    out: list[tuple[str, str]] = []
    while len(out) < n:
        pair = (rng.choice(list(COLOURS)), rng.choice(SHAPES))
        if pair not in taken:
            out.append(pair)
            taken.add(pair)
    return out


def _alt_partial(scene: Scene, rng: random.Random) -> str:
    """One object right, the others made up."""
    o = rng.choice(scene.objects)
    fakes = _absent_pairs(scene, rng, rng.randint(1, 2))
    groups = [(o.colour, o.shape, 1)] + [(c, s, rng.randint(1, 2)) for c, s in fakes]
    rng.shuffle(groups)
    return rng.choice(WEB_FRAMES).format(c=_core(groups, rng.random() < 0.5), junk=rng.choice(WEB_JUNK))


def _alt_wrong(scene: Scene, rng: random.Random) -> str:
    """Same number of groups, but every colour/shape pair is one the scene does not have."""
    true_groups = _groups(scene)
    fakes = _absent_pairs(scene, rng, len(true_groups))
    groups = [(c, s, n) for (c, s), (_, _, n) in zip(fakes, true_groups, strict=True)]
    return rng.choice(WEB_FRAMES).format(c=_core(groups, rng.random() < 0.5), junk=rng.choice(WEB_JUNK))


def _alt_irrelevant(scene: Scene, rng: random.Random) -> str:
    return rng.choice((" ", " | ", "，")).join(rng.sample(WEB_JUNK, rng.randint(1, 2)))


def _alt_keywords(scene: Scene, rng: random.Random) -> str:
    """An SEO keyword list: a few true words drowned in generic ones."""
    o = rng.choice(scene.objects)
    words = [o.colour, o.shape] + rng.sample(WEB_WORDS, rng.randint(2, 4))
    rng.shuffle(words)
    return rng.choice((" ", ",", " ")).join(words)


_ALT_MAKERS: dict[str, Callable[[Scene, random.Random], str]] = {
    "partial": _alt_partial,
    "wrong": _alt_wrong,
    "irrelevant": _alt_irrelevant,
    "keywords": _alt_keywords,
}


def alt_text(scene: Scene, rng: random.Random, kind: str | None = None) -> AltText:
    """Noisy web alt-text of a given (or random) kind in ALT_KINDS."""
    kind = kind or rng.choice(ALT_KINDS)
    return AltText(_ALT_MAKERS[kind](scene, rng), kind)


# --------------------------------------------------------------------------- VQA

_Q = {
    "count": ("图中有几个{r}？", "这张图片里一共有多少个{r}？", "数一数，图里有几个{r}？", "{r}有几个？"),
    "colour": ("{r}是什么颜色的？", "{r}的颜色是什么？", "图中{r}是什么颜色？"),
    "shape": ("{r}是什么形状？", "{r}是什么图形？", "图中{r}是哪种形状？"),
    "existence": ("图中有{r}吗？", "图片里是否有{r}？", "这张图中存在{r}吗？"),
    "position": ("{r}在图片的什么位置？", "{r}位于哪里？", "{r}在图中的哪个位置？"),
    "relation_x": ("{a}在{b}的左边还是右边？", "{a}位于{b}的左边还是右边？"),
    "relation_y": ("{a}在{b}的上面还是下面？", "{a}位于{b}的上面还是下面？"),
    "size": ("{r}是大的还是小的？", "{r}大还是小？", "图中{r}的尺寸是大还是小？"),
}


def _ask(key: str, rng: random.Random, **fields: str) -> str:
    return rng.choice(_Q[key]).format(**fields)


def _q_count(scene: Scene, rng: random.Random) -> QA:
    o = rng.choice(scene.objects)
    options: list[dict[str, str]] = [
        {},
        {"shape": o.shape},
        {"shape": o.shape},
        {"colour": o.colour, "shape": o.shape},
        {"colour": o.colour},
        {"shape": rng.choice(SHAPES)},
    ]
    attrs = rng.choice(options)
    ref = phrase(**attrs)
    return QA(_ask("count", rng, r=ref), str(len(matching(scene, attrs))), "count", (ref,))


def _q_attribute(qtype: str, attr: str) -> Callable[[Scene, random.Random], QA | None]:
    """Questions that name one object without `attr` and ask for `attr` (colour/shape/size/position)."""

    def make(scene: Scene, rng: random.Random) -> QA | None:
        i = rng.randrange(len(scene.objects))
        ref = _pick_ref(scene, i, rng, without=attr)
        if ref is None:
            return None
        return QA(_ask(qtype, rng, r=ref.text), getattr(scene.objects[i], attr), qtype, (ref.text,))

    return make


def _q_existence(scene: Scene, rng: random.Random) -> QA:
    keys = rng.choice((("shape",), ("colour", "shape"), ("colour",)))
    if rng.random() < 0.5:  # a positive: describe a real object
        o = rng.choice(scene.objects)
        attrs = {k: getattr(o, k) for k in keys}
    else:  # a negative: resample until nothing fits
        attrs = {"shape": rng.choice(SHAPES), "colour": rng.choice(list(COLOURS))}
        attrs = {k: attrs[k] for k in keys}
        while matching(scene, attrs):
            attrs = {k: (rng.choice(SHAPES) if k == "shape" else rng.choice(list(COLOURS))) for k in keys}
    ref = phrase(**attrs)
    return QA(_ask("existence", rng, r=ref), "是" if matching(scene, attrs) else "否", "existence", (ref,))


def _q_relation(scene: Scene, rng: random.Random) -> QA | None:
    if len(scene.objects) < 2:
        return None
    i, j = rng.sample(range(len(scene.objects)), 2)
    ra, rb = _pick_ref(scene, i, rng, "position"), _pick_ref(scene, j, rng, "position")
    if ra is None or rb is None:
        return None
    rel = _relation(scene.objects[i], scene.objects[j], rng)
    key = "relation_x" if rel in ("左边", "右边") else "relation_y"
    return QA(_ask(key, rng, a=ra.text, b=rb.text), rel, "relation", (ra.text, rb.text))  # type: ignore[arg-type]


_VQA_MAKERS: dict[str, Callable[[Scene, random.Random], QA | None]] = {
    "count": _q_count,
    "colour": _q_attribute("colour", "colour"),
    "shape": _q_attribute("shape", "shape"),
    "existence": _q_existence,
    "position": _q_attribute("position", "position"),
    "relation": _q_relation,
    "size": _q_attribute("size", "size"),
}


def vqa(scene: Scene, rng: random.Random, qtype: str | None = None, tries: int = 8) -> QA | None:
    """One question of `qtype` (random type if None), or None if no unambiguous one was found."""
    for _ in range(tries):
        qa = _VQA_MAKERS[qtype or rng.choice(QUESTION_TYPES)](scene, rng)
        if qa is not None:
            return qa
    return None


def vqa_set(scene: Scene, rng: random.Random, n: int) -> list[QA]:
    """Up to `n` distinct questions, of different types where possible."""
    types = list(QUESTION_TYPES)
    rng.shuffle(types)
    out: list[QA] = []
    seen: set[str] = set()
    for qtype in (types * ((n // len(types)) + 2))[: n * 2]:
        qa = vqa(scene, rng, qtype)
        if qa is not None and qa.question not in seen:
            out.append(qa)
            seen.add(qa.question)
        if len(out) == n:
            break
    return out


# --------------------------------------------------------------------------- dialogues


def _colours_reply(objs: Sequence[SceneObject]) -> str:
    colours = [o.colour for o in objs]
    if len(colours) == 1:
        return colours[0]
    return f"都是{colours[0]}" if len(set(colours)) == 1 else f"分别是{_join(colours)}"


def _dlg_count_then_colour(scene: Scene, rng: random.Random) -> list[Turn]:
    """How many X? -> what colour are they? -> where are they?"""
    shape = rng.choice(scene.objects).shape
    objs = [o for o in scene.objects if o.shape == shape]
    plural = len(objs) > 1
    turns = [
        (
            rng.choice(("图里有几个{s}？", "图中一共有几个{s}？", "数一数有几个{s}？")).format(s=shape),
            str(len(objs)),
        ),
        ("它们是什么颜色？" if plural else "它是什么颜色的？", _colours_reply(objs)),
    ]
    if rng.random() < 0.6:
        turns.append(
            ("它们分别在什么位置？" if plural else "它在什么位置？", _join([o.position for o in objs]))
        )
    return turns


def _dlg_locate_then_describe(scene: Scene, rng: random.Random) -> list[Turn] | None:
    """Where is X? -> what colour/shape/size is it? -> is there anything to its left/right?"""
    i = rng.randrange(len(scene.objects))
    o, ref = scene.objects[i], _pick_ref(scene, i, rng, "position")
    if ref is None:
        return None
    turns = [(_ask("position", rng, r=ref.text), o.position)]
    follow = [
        ("它是什么颜色的？", o.colour, "colour"),
        ("它是什么形状？", o.shape, "shape"),
        ("它是大的还是小的？", o.size, "size"),
    ]
    follow = [f for f in follow if f[2] not in ref.uses]
    if follow:
        q, a, _ = rng.choice(follow)
        turns.append((q, a))
    if not follow or rng.random() < 0.6:
        side = rng.choice(("左边", "右边"))
        others = [p for p in scene.objects if (p.col < o.col if side == "左边" else p.col > o.col)]
        turns.append((f"它的{side}还有其他图形吗？", "是" if others else "否"))
    return turns


def _follow_up_position(scene: Scene, ref: RefExpr, rng: random.Random) -> str:
    """Ask where an object just mentioned in a caption is: "它在哪里？" / "其中，X在什么位置？"."""
    if len(scene.objects) == 1:
        return rng.choice(("它在图片的什么位置？", "它位于哪里？"))
    return "其中，" + _ask("position", rng, r=ref.text)


def _dlg_caption_then_locate(scene: Scene, rng: random.Random) -> list[Turn] | None:
    """Describe the image -> where is X? -> and Y?"""
    located = [(i, r) for i in range(len(scene.objects)) if (r := _pick_ref(scene, i, rng, "position"))]
    if not located:
        return None
    rng.shuffle(located)
    (i, ra), rest = located[0], located[1:]
    turns = [
        (caption_instruction(rng), concise_caption(scene)),
        (_follow_up_position(scene, ra, rng), scene.objects[i].position),
    ]
    if rest:
        j, rb = rest[0]
        turns.append((f"那{rb.text}呢？", scene.objects[j].position))
    return turns


def _dlg_exists_then_count(scene: Scene, rng: random.Random) -> list[Turn]:
    """Is there an X? -> how many? -> what colour are they? (or: then what is there?)"""
    shape = rng.choice(SHAPES)
    objs = [o for o in scene.objects if o.shape == shape]
    first = (_ask("existence", rng, r=shape), "是" if objs else "否")
    if not objs:
        return [first, ("那图里有什么？", concise_caption(scene))]
    return [
        first,
        ("有几个？", str(len(objs))),
        ("它们是什么颜色？" if len(objs) > 1 else "它是什么颜色的？", _colours_reply(objs)),
    ]


_DIALOGUES: tuple[Callable[[Scene, random.Random], list[Turn] | None], ...] = (
    _dlg_count_then_colour,
    _dlg_locate_then_describe,
    _dlg_caption_then_locate,
    _dlg_exists_then_count,
)


def dialogue(scene: Scene, rng: random.Random) -> list[Turn]:
    """A 2-4 turn conversation whose later questions refer back ("它们", "那…呢") to earlier ones."""
    while True:
        turns = rng.choice(_DIALOGUES)(scene, rng)
        if turns:
            return turns


# --------------------------------------------------------------------------- grounding


def grounding(scene: Scene, rng: random.Random) -> Grounding | None:
    """A unique referring expression for a random object and its box, or None if none exists."""
    order = list(range(len(scene.objects)))
    rng.shuffle(order)
    for i in order:
        refs = referring_expressions(scene, i)
        if refs:
            ref = rng.choice(refs)
            bbox = scene.objects[i].bbox
            return Grounding(
                ref.text, i, normalize_box(bbox, scene.image_size), format_box(bbox, scene.image_size)
            )
    return None


# --------------------------------------------------------------------------- detection

DETECTION_INSTRUCTIONS = (
    "请找出图中的每一个图形，给出它们的坐标框。",
    "图里有什么？请给出每个图形的坐标框。",
    "请框出图中所有的图形。",
    "给出图中每个图形的边界框坐标。",
)


@dataclass(frozen=True)
class Detection:
    labels: tuple[str, ...]  # each object's class (its shape name), in reading order
    boxes: tuple[tuple[int, int, int, int], ...]  # (x1, y1, x2, y2) in 0..1000, same order
    answer: str  # every object as colour + shape + box, e.g. "红色的圆形<box>(..),(..)</box>，..."


def detection(scene: Scene) -> Detection:
    """Every object with its box, top row first and left to right in a row; the class is the shape."""
    objs = sorted(scene.objects, key=lambda o: (o.row, o.col))
    answer = "，".join(f"{o.colour}的{o.shape}{format_box(o.bbox, scene.image_size)}" for o in objs)
    boxes = tuple(normalize_box(o.bbox, scene.image_size) for o in objs)
    return Detection(tuple(o.shape for o in objs), boxes, answer)


def detection_instruction(rng: random.Random) -> str:
    """A user request for every object and its box."""
    return rng.choice(DETECTION_INSTRUCTIONS)


# --------------------------------------------------------------------------- text-only chit-chat

_MIXES = {("红色", "黄色"): "橙色", ("蓝色", "黄色"): "绿色", ("红色", "蓝色"): "紫色"}
_THINGS = {
    "香蕉": "黄色",
    "草": "绿色",
    "晴朗的天空": "蓝色",
    "西红柿": "红色",
    "茄子": "紫色",
    "橙子": "橙色",
    "乌鸦": "黑色",
    "柠檬": "黄色",
    "树叶": "绿色",
    "大海": "蓝色",
    "葡萄": "紫色",
    "煤炭": "黑色",
}
_FACTS = (
    ("三角形有几条边？", "3"),
    ("三角形有几个角？", "3"),
    ("正方形有几个角？", "4"),
    ("长方形有几条边？", "4"),
    ("菱形有几条边？", "4"),
    ("五角星有几个角？", "5"),
    ("圆形有几个角？", "0"),
    ("哪种图形没有角？", "圆形"),
    ("四条边相等、四个角都是直角的图形叫什么？", "正方形"),
    ("左边的反义词是什么？", "右边"),
    ("上面的反义词是什么？", "下面"),
    ("大的反义词是什么？", "小"),
)
_SMALL_TALK = (
    ("你好", "你好！我是SeeChat，可以和你聊聊图片里的内容。"),
    ("你是谁？", "我是SeeChat，一个能看图说话的中文助手。"),
    ("你能做什么？", "我可以描述图片、回答关于图片的问题，还能用坐标框指出物体的位置。"),
    ("谢谢", "不客气！"),
    ("再见", "再见，欢迎下次再来！"),
    ("早上好", "早上好！今天想看什么图片？"),
    ("你会看图吗？", "会的，请把图片发给我，我来告诉你图里有什么。"),
)


def _chat_mix(rng: random.Random) -> Turn:
    (a, b), c = rng.choice(list(_MIXES.items()))
    if rng.random() < 0.5:
        a, b = b, a
    q = rng.choice(
        ("{a}和{b}混在一起是什么颜色？", "把{a}和{b}的颜料混合，会得到什么颜色？", "{a}加{b}会变成什么颜色？")
    )
    return q.format(a=a, b=b), c


def _chat_thing(rng: random.Random) -> Turn:
    thing, colour = rng.choice(list(_THINGS.items()))
    return rng.choice(("{t}通常是什么颜色？", "{t}是什么颜色的？")).format(t=thing), colour


def _chat_arith(rng: random.Random) -> Turn:
    a, b = rng.randint(1, 4), rng.randint(1, 4)
    s = rng.choice(SHAPES)
    q = rng.choice((f"{CN_NUMBER[a]}个{s}加{CN_NUMBER[b]}个{s}一共几个？", f"{a}加{b}等于几？"))
    return q, str(a + b)


def chitchat(rng: random.Random) -> Turn:
    """One text-only exchange: colour mixing, colours of things, shape facts, arithmetic, small talk."""
    kind = rng.choice(("mix", "thing", "fact", "arith", "talk"))
    if kind == "mix":
        return _chat_mix(rng)
    if kind == "thing":
        return _chat_thing(rng)
    if kind == "arith":
        return _chat_arith(rng)
    return rng.choice(_FACTS if kind == "fact" else _SMALL_TALK)


# --------------------------------------------------------------------------- the character set


def _strings_of(value: object) -> Iterator[str]:
    """Every string in a value: containers are walked, and so are the constants of functions'
    code (the literals inside function bodies, e.g. "它们分别在什么位置？")."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, types.CodeType):
        yield from _strings_of(value.co_consts)
    elif isinstance(value, types.FunctionType):
        yield from _strings_of(value.__code__)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings_of(k)
            yield from _strings_of(v)
    elif isinstance(value, tuple | list | frozenset | set):
        for v in value:
            yield from _strings_of(v)


# Characters the world's generators do not hold as constants but its users type: the evaluation and
# demo prompts and the stage-1 pair instructions (seechat.eval.tasks, seechat.mini.demo,
# seechat/mini/recipes).
PROMPT_TEXT = (
    "请用一句话描述这张图片。简要描述图片内容。这张图里有什么？请给出的位置（坐标框）。图中有几个图形？"
    "请给出第一个图形的位置（坐标框）。，。：；！？、（）【】《》“”‘’…—"
)


def charset() -> list[str]:
    """Every character the mini world can write, sorted: the strings of this module and of
    `seechat.mini.scenes` (names, templates, phrasings, literals in function bodies), the prompts
    above, and printable ASCII.

    A pure function of the code, not of a generated world, so the shipped experts' vocabularies
    cover every world any seed generates (a test checks a fresh world against it)."""
    from seechat.data.char_tokenizer import ASCII
    from seechat.mini import scenes

    chars = set(ASCII) | set(PROMPT_TEXT)
    for module in (globals(), vars(scenes)):
        for name, value in module.items():
            if not name.startswith("__"):
                for s in _strings_of(value):
                    chars.update(s)
    return sorted(chars)
