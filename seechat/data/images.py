"""The one home for opening images: bytes or files -> an RGB PIL image, the same way for serving,
training readers and the shard writer (they used to differ: serving dropped alpha, so transparent
areas turned black, and ignored EXIF orientation).

`load_image(source)` does, in order:

1. **Format allow-list, checked on the bytes.** Only `IMAGE_FORMATS` (PNG, JPEG, WebP, GIF, BMP)
   are opened, whatever a file name or a declared `image/...` media type says. Pillow is asked to
   try only those plugins, so no other parser ever sees the bytes (EPS would run Ghostscript; PSD,
   TIFF, PDF, ICNS ... are large attack surfaces nobody needs here).
2. **Size before pixels.** The header's width x height is checked against `max_pixels` before
   anything is decoded (decompression bombs: a few KB of PNG can declare gigapixels).
3. **Decode and normalise.** The first frame only (animated GIF / PNG / WebP); EXIF orientation
   applied; transparency composited on white (web PNGs and GIFs often carry alpha); RGB.

`probe_image(data)` runs steps 1-2 only (no pixel is decoded): a server checks every image of a
request this way before it decodes any. `load_image_file(path)` is `load_image` for a user's file
path (`~` expanded, errors name the file). `IMAGE_EXTENSIONS` is the one list of file extensions
taken for images (folders, shard members, command-line inputs): exactly the accepted formats'
(three lists used to disagree: the training reader skipped a .gif or .bmp sample as having no image,
while captioning and the win rate took those files).

What this module is not: image *sources* (folders, JSONL lists, shards: `seechat.data.image_sources`;
training shards: `seechat.data.pairs`) and pixel preprocessing for a vision tower
(`SeeChatProcessor.preprocess_images`).
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow format ids; "MPO" is how Pillow names a JPEG carrying extra pictures (many phone cameras
# write one); only its first picture is used, like a GIF's first frame.
IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
# File extensions of those formats, lower case; the order is the preference when a shard sample
# holds several image members.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
_OPENED_AS = {"MPO": "JPEG"}
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000  # 40 MP: any real photo fits; a decompression bomb does not
WHITE = (255, 255, 255)


class ImageError(ValueError):
    """The bytes are not an image this project will decode; the message says why."""


@dataclass(frozen=True)
class ImageInfo:
    """What the header says: Pillow's format id (one of IMAGE_FORMATS) and (width, height)."""

    format: str
    size: tuple[int, int]


def _open(
    fp: io.BytesIO | str | os.PathLike[str], max_pixels: int | None, formats: tuple[str, ...]
) -> Image.Image:
    """Open lazily (header only) with only the allowed plugins, and check the declared size."""
    try:
        img = Image.open(fp, formats=list(formats))
    except UnidentifiedImageError:
        raise ImageError(
            f"the image could not be decoded as one of the accepted formats ({', '.join(formats)}; the "
            "format is read from the bytes, not from a file name or media type)"
        ) from None
    fmt = _OPENED_AS.get(img.format or "", img.format)
    if fmt not in formats:  # a plugin can hand back a subformat; never let one slip through
        img.close()
        raise ImageError(f"image format {img.format} is not accepted (accepted: {', '.join(formats)})")
    w, h = img.size
    if w <= 0 or h <= 0:
        img.close()
        raise ImageError(f"the image declares an empty size {w}x{h}")
    if max_pixels is not None and w * h > max_pixels:
        img.close()
        raise ImageError(
            f"the image is {w}x{h} = {w * h:,} pixels, more than the limit of {max_pixels:,} "
            "(a decompression bomb, or simply too large: resize it first)"
        )
    return img


@contextmanager
def _decode_errors(what: str) -> Iterator[None]:
    """Turn whatever a decoder raises on bad data into ImageError. (No warnings filter here: it is
    process-global state, unsafe across request threads; the size was checked before decoding.)"""
    try:
        yield
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{what} is too large to decode safely (a decompression bomb?): {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, struct.error) as e:
        raise ImageError(f"{what} could not be decoded ({type(e).__name__}: {e})") from None


def probe_image(
    data: bytes, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, formats: tuple[str, ...] = IMAGE_FORMATS
) -> ImageInfo:
    """Check untrusted image bytes without decoding any pixel: an accepted format, read from the
    bytes, and at most `max_pixels` pixels (None: Pillow's own bomb limit). Raises ImageError."""
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    with _decode_errors("the image"), _open(io.BytesIO(data), max_pixels, formats) as img:
        return ImageInfo(_OPENED_AS.get(img.format or "", img.format or ""), img.size)


def to_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied, transparency composited on white, RGB. The image must be loaded
    (a PIL image made in memory is); returns a new image or `image` itself when already plain RGB."""
    image = (
        ImageOps.exif_transpose(image) if image.getexif().get(0x0112, 1) != 1 else image
    )  # 0x0112: Orientation
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(
    source: bytes | str | os.PathLike[str] | Image.Image,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    formats: tuple[str, ...] = IMAGE_FORMATS,
) -> Image.Image:
    """Open an image the way every part of seechat does: accepted format (read from the bytes),
    size checked before decoding (`max_pixels`; None: Pillow's own limit), first frame, EXIF
    orientation applied, transparency on white, RGB. `source`: encoded bytes, a file path, or an
    already decoded PIL image (only normalised: its decoder has already run).

    Raises ImageError (a ValueError) for anything that is not such an image; the message says why.
    """
    if isinstance(source, Image.Image):
        source.load()
        return to_rgb(source)
    if isinstance(source, bytes):
        if not source:
            raise ImageError("the image is empty (0 bytes)")
        what, fp = "the image", io.BytesIO(source)
    else:
        what, fp = str(source), Path(source)
        if not fp.is_file():
            raise ImageError(f"{what}: no such file")
    with _decode_errors(what):
        img, out = _open(fp, max_pixels, formats), None
        try:
            img.load()  # a full decode: truncated data fails here, not later
            out = to_rgb(img)
            if out is img and getattr(img, "n_frames", 1) > 1:
                out = img.copy()  # detach the first frame from the still-open multi-frame file
        finally:
            if out is not img:
                img.close()
        return out


def load_image_file(
    path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> Image.Image:
    """`load_image` of a file a user named (`~` expanded); every error message starts with the path."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ImageError(f"{p}: no such file")
    try:
        return load_image(p.read_bytes(), max_pixels)
    except ImageError as e:
        raise ImageError(f"{p}: {e}") from None
