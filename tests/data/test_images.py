"""load_image: the one way seechat opens an image (serving, CLI, shard writer, training readers)."""

from __future__ import annotations

import io
import zlib

import pytest
from PIL import Image

from seechat.data.images import IMAGE_FORMATS, ImageError, load_image, probe_image
from seechat.data.shards import encode_image, read_pair_table, write_pair_shards


def encoded(image: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return buf.getvalue()


def half_red() -> Image.Image:
    """40 x 30, left half red, right half white."""
    im = Image.new("RGB", (40, 30), (255, 255, 255))
    im.paste((200, 0, 0), (0, 0, 20, 30))
    return im


def test_alpha_is_composited_on_white_and_exif_orientation_applied():
    rgba = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    rgba.paste((200, 0, 0, 255), (0, 0, 20, 30))
    assert load_image(encoded(rgba, "PNG")).tobytes() == half_red().tobytes()
    la = Image.new("LA", (4, 4), (0, 0))
    assert load_image(encoded(la, "PNG")).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 0)
    assert load_image(encoded(palette, "GIF", transparency=0)).getpixel((1, 1)) == (255, 255, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; shown turned 90 degrees clockwise
    stored = half_red().transpose(Image.Transpose.ROTATE_90)
    for fmt in ("PNG", "WEBP"):
        shown = load_image(encoded(stored, fmt, exif=exif, **({"lossless": True} if fmt == "WEBP" else {})))
        assert shown.size == (40, 30) and shown.tobytes() == half_red().tobytes(), fmt
    jpeg = load_image(encoded(stored, "JPEG", exif=exif, quality=95))
    assert jpeg.size == (40, 30) and jpeg.getpixel((5, 15))[0] > 150 and jpeg.getpixel((35, 15))[1] > 200


def test_every_allowed_format_opens_by_its_bytes_and_nothing_else_does(tmp_path):
    for fmt in IMAGE_FORMATS:
        data = encoded(half_red(), fmt)
        assert probe_image(data).format == fmt and load_image(data).mode == "RGB"
        (tmp_path / f"x.{fmt.lower()}").write_bytes(data)
        assert load_image(tmp_path / f"x.{fmt.lower()}").size == (40, 30)
    frames = [Image.new("P", (8, 8), i) for i in (1, 2, 3)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    assert load_image(gif.getvalue()).size == (8, 8)  # the first frame
    refused = {
        "TIFF": encoded(half_red(), "TIFF"),
        "ICO": encoded(half_red(), "ICO"),
        "PPM": encoded(half_red(), "PPM"),
        "EPS": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n",
        "PDF": b"%PDF-1.4\n%\n",
        "text": b"hello",
    }
    for data in refused.values():
        with pytest.raises(ImageError, match="accepted formats"):
            load_image(data)
        (tmp_path / "x.png").write_bytes(data)  # a misleading file name changes nothing
        with pytest.raises(ImageError, match="accepted formats"):
            load_image(tmp_path / "x.png")
    assert load_image(encoded(half_red(), "TIFF"), formats=IMAGE_FORMATS + ("TIFF",)).size == (40, 30)


def bomb_png(side: int) -> bytes:
    """A 1x1 PNG whose header says side x side pixels (the data is never decoded)."""
    data = bytearray(encoded(Image.new("L", (1, 1)), "PNG"))
    data[16:24] = side.to_bytes(4, "big") + side.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def test_size_is_checked_before_decoding_and_bad_data_is_an_image_error(tmp_path):
    with pytest.raises(ImageError, match="8000x8000 = 64,000,000 pixels, more than the limit of 40,000,000"):
        probe_image(bomb_png(8_000))  # under Pillow's own limit, over seechat's default
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(bomb_png(50_000), max_pixels=None)  # 2.5 gigapixels: Pillow's own limit still holds
    truncated = encoded(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")[:-200]
    assert probe_image(truncated).size == (64, 64)  # the header is fine ...
    with pytest.raises(ImageError, match="could not be decoded"):
        load_image(truncated)  # ... the pixels are not
    for data in (b"", encoded(half_red(), "PNG")[:30]):
        with pytest.raises(ImageError):
            load_image(data)
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.png")
    assert load_image(half_red().convert("RGBA")).mode == "RGB"  # a decoded image is only normalised


def test_the_shard_writer_prepares_images_with_load_image(tmp_path):
    rgba = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    rgba.paste((200, 0, 0, 255), (0, 0, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    sources = [
        encoded(rgba, "PNG"),
        encoded(half_red().transpose(Image.Transpose.ROTATE_90), "PNG", exif=exif),
    ]
    for data in sources:
        want = io.BytesIO()
        load_image(data).save(want, "JPEG", quality=90)
        assert encode_image(data) == want.getvalue()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(sources[0])
    (tmp_path / "in" / "b.png").write_bytes(encoded(half_red(), "TIFF"))  # a TIFF behind a .png name
    table = tmp_path / "in" / "pairs.jsonl"
    table.write_text(
        '{"image": "a.png", "caption": "红"}\n{"image": "b.png", "caption": "白"}\n', encoding="utf-8"
    )
    stats = write_pair_shards(read_pair_table(table), tmp_path / "out", image_size=None)
    assert stats.samples == 1 and stats.failures == 1 and "accepted formats" in stats.failed[0]["reason"]
