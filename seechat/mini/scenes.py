"""Procedural scenes of the mini world: coloured shapes on a pale background, with ground truth.

A scene is 1-4 objects on a 3x3 grid, at most one object per cell, so objects never overlap and
every object has one grid position. Each object has a shape, a colour, a size (大/小) and a pixel
bounding box. `generate_scene` draws a scene from a `random.Random`; `render` turns it into an RGB
PIL image with ImageDraw only (no fonts), drawn at 4x and downsampled so edges stay crisp at 64 px.

This module is the ground truth and the pixels. It is not the Chinese text (see `seechat.mini.scene_text`)
and it does not write datasets (see `seechat.mini.world`).

Coordinates: pixels of the final image, origin top-left, x to the right, y down. A bbox
`(x1, y1, x2, y2)` is half-open: the object covers columns x1..x2-1 and rows y1..y2-1.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# Object vocabulary. The Chinese names are the canonical answers used everywhere in the mini world.
SHAPES: tuple[str, ...] = ("圆形", "正方形", "三角形", "长方形", "菱形", "星形")
COLOURS: dict[str, tuple[int, int, int]] = {  # name -> base RGB; saturated, far from the pale backgrounds
    "红色": (220, 30, 30),
    "绿色": (30, 160, 50),
    "蓝色": (30, 70, 220),
    "黄色": (235, 200, 0),
    "紫色": (140, 50, 180),
    "橙色": (245, 130, 20),
    "黑色": (30, 30, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {  # name -> base RGB
    "白色": (248, 248, 248),
    "浅灰色": (222, 222, 222),
    "米色": (242, 232, 208),
    "浅蓝色": (212, 228, 246),
    "浅绿色": (216, 240, 216),
    "浅粉色": (246, 222, 228),
}
SIZES: tuple[str, ...] = ("大", "小")
# 3x3 grid vocabulary, indexed [row][col]; these are the canonical position answers.
GRID: tuple[tuple[str, str, str], ...] = (
    ("左上", "上方", "右上"),
    ("左边", "中间", "右边"),
    ("左下", "下方", "右下"),
)
POSITIONS: tuple[str, ...] = tuple(name for row in GRID for name in row)

COUNT_WEIGHTS = (0.2, 0.3, 0.3, 0.2)  # P(1..4 objects)
SIZE_FRACTION = {"大": (0.74, 0.88), "小": (0.42, 0.55)}  # object side as a fraction of the cell side
RECT_ASPECT = 0.55  # 长方形 height / width: clearly not a square even when small
COLOUR_JITTER = 12  # +- per RGB channel, so colours are not one exact value
SUPERSAMPLE = 4  # draw at 4x, then box-filter down: anti-aliased but crisp edges


@dataclass(frozen=True)
class SceneObject:
    """One object: what it is, and where (pixel bbox and grid cell)."""

    shape: str
    colour: str
    size: str  # "大" or "小"
    bbox: tuple[int, int, int, int]  # (x1, y1, x2, y2) pixels, half-open
    row: int  # grid row 0..2, top to bottom
    col: int  # grid column 0..2, left to right
    rgb: tuple[int, int, int]  # the exact fill colour (base colour + jitter)

    @property
    def position(self) -> str:
        """Grid position name, one of `POSITIONS`."""
        return GRID[self.row][self.col]


@dataclass(frozen=True)
class Scene:
    """A whole scene; `objects` are in reading order (row, then column)."""

    image_size: int  # square images, pixels per side
    background: str  # a key of BACKGROUNDS
    background_rgb: tuple[int, int, int]
    noise: float  # std of per-pixel Gaussian background noise, in 0..255 units (0 = flat)
    noise_seed: int  # seeds the noise so that render() is deterministic
    objects: tuple[SceneObject, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ground truth (tuples become lists); `position` is added for readers."""
        d = asdict(self)
        for o, od in zip(self.objects, d["objects"], strict=True):
            od["position"] = o.position
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        objects = tuple(
            SceneObject(
                shape=o["shape"],
                colour=o["colour"],
                size=o["size"],
                bbox=tuple(o["bbox"]),
                row=o["row"],
                col=o["col"],
                rgb=tuple(o["rgb"]),
            )
            for o in d["objects"]
        )
        return cls(
            image_size=d["image_size"],
            background=d["background"],
            background_rgb=tuple(d["background_rgb"]),
            noise=d["noise"],
            noise_seed=d["noise_seed"],
            objects=objects,
        )


def fingerprint(scene: Scene) -> str:
    """Hash of what a scene *means*: background name and each object's cell, shape, colour, size.

    Two scenes with the same fingerprint read the same in every caption and answer, even if their
    pixels differ by jitter; the world uses this to keep splits disjoint.
    """
    content = [scene.background] + sorted((o.row, o.col, o.shape, o.colour, o.size) for o in scene.objects)
    return hashlib.sha1(json.dumps(content, ensure_ascii=False).encode()).hexdigest()[:16]


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def _cell_bounds(image_size: int, k: int) -> tuple[int, int]:
    """Integer pixel span [lo, hi) of grid row/column k."""
    return (k * image_size) // 3, ((k + 1) * image_size) // 3


def _place(shape: str, size: str, row: int, col: int, image_size: int, rng: random.Random) -> tuple[int, ...]:
    """A bbox for an object inside its cell, leaving >= 1 px margin so neighbours never touch."""
    x0, x1 = _cell_bounds(image_size, col)
    y0, y1 = _cell_bounds(image_size, row)
    cell = min(x1 - x0, y1 - y0)
    lo, hi = SIZE_FRACTION[size]
    w = max(3, round(cell * rng.uniform(lo, hi)))
    h = max(2, round(w * RECT_ASPECT)) if shape == "长方形" else w
    bx = x0 + rng.randint(1, max(1, x1 - x0 - w - 1))
    by = y0 + rng.randint(1, max(1, y1 - y0 - h - 1))
    return (bx, by, bx + w, by + h)


def generate_scene(rng: random.Random, image_size: int = 64, max_objects: int = 4) -> Scene:
    """Draw one scene. Later objects copy an earlier shape or colour now and then, so that counting
    ("两个圆形") and disambiguation ("左边的红色圆形") questions have something to work with."""
    n = rng.choices(range(1, max_objects + 1), weights=COUNT_WEIGHTS[:max_objects])[0]
    cells = sorted(rng.sample(range(9), n))  # reading order
    specs: list[tuple[str, str]] = []
    for _ in range(n):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        if specs and rng.random() < 0.3:
            shape = rng.choice(specs)[0]
        if specs and rng.random() < 0.3:
            colour = rng.choice(specs)[1]
        specs.append((shape, colour))
    objects = []
    for cell, (shape, colour) in zip(cells, specs, strict=True):
        size = rng.choice(SIZES)
        row, col = divmod(cell, 3)
        bbox = _place(shape, size, row, col, image_size, rng)
        rgb = _jitter(COLOURS[colour], rng, COLOUR_JITTER)
        objects.append(SceneObject(shape, colour, size, bbox, row, col, rgb))  # type: ignore[arg-type]
    background = rng.choice(list(BACKGROUNDS))
    return Scene(
        image_size=image_size,
        background=background,
        background_rgb=_jitter(BACKGROUNDS[background], rng, 5),
        noise=rng.choice((0.0, 0.0, 2.0, 4.0)),
        noise_seed=rng.getrandbits(32),
        objects=tuple(objects),
    )


def generate_scenes(seed: int, n: int, image_size: int = 64, max_objects: int = 4) -> list[Scene]:
    """`n` scenes from one seed; the same arguments always give the same scenes."""
    rng = random.Random(seed)
    return [generate_scene(rng, image_size, max_objects) for _ in range(n)]


def _star(x1: float, y1: float, x2: float, y2: float) -> list[tuple[float, float]]:
    """A five-pointed star stretched to fill the box exactly (so the bbox is tight)."""
    pts = []
    for i in range(10):
        r = 1.0 if i % 2 == 0 else 0.45
        a = -math.pi / 2 + i * math.pi / 5
        pts.append((r * math.cos(a), r * math.sin(a)))
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    (ax, bx), (ay, by) = (min(xs), max(xs)), (min(ys), max(ys))
    return [
        (x1 + (px - ax) / (bx - ax) * (x2 - x1), y1 + (py - ay) / (by - ay) * (y2 - y1)) for px, py in pts
    ]


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, s: int) -> None:
    """Draw `obj` at supersampling factor `s`; the outline touches the bbox edges."""
    x1, y1, x2, y2 = (v * s for v in obj.bbox)
    x2, y2 = x2 - 1, y2 - 1  # PIL boxes are inclusive
    xm, ym = (x1 + x2) / 2, (y1 + y2) / 2
    fill = obj.rgb
    if obj.shape == "圆形":
        draw.ellipse((x1, y1, x2, y2), fill=fill)
    elif obj.shape in ("正方形", "长方形"):
        draw.rectangle((x1, y1, x2, y2), fill=fill)
    elif obj.shape == "三角形":
        draw.polygon([(xm, y1), (x2, y2), (x1, y2)], fill=fill)
    elif obj.shape == "菱形":
        draw.polygon([(xm, y1), (x2, ym), (xm, y2), (x1, ym)], fill=fill)
    elif obj.shape == "星形":
        draw.polygon(_star(x1, y1, x2, y2), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; known: {SHAPES}")


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image of `scene.image_size` pixels square; deterministic."""
    n, s = scene.image_size, SUPERSAMPLE
    bg = np.empty((n, n, 3), dtype=np.float32)  # (H, W, 3)
    bg[:] = scene.background_rgb
    if scene.noise > 0:
        bg += np.random.default_rng(scene.noise_seed).normal(0.0, scene.noise, size=bg.shape)
    bg_img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    # Objects are drawn on a transparent 4x layer and downsampled, then composited over the noisy
    # background, so the noise stays per-pixel and the shape edges are anti-aliased.
    layer = Image.new("RGBA", (n * s, n * s), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for obj in scene.objects:
        _draw_object(draw, obj, s)
    layer = layer.resize((n, n), Image.Resampling.BOX)
    bg_img.paste(layer, (0, 0), layer)
    return bg_img
