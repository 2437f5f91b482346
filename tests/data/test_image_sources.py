"""Image sources (folder, JSONL list, text list, files, shards) and the one image-extension list."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from seechat.data.image_sources import (
    FileImages,
    FolderImages,
    JsonlImages,
    ShardImages,
    TextListImages,
    is_image_file,
    open_image_source,
)
from seechat.data.images import IMAGE_EXTENSIONS, IMAGE_FORMATS, ImageError, load_image_file
from seechat.data.jsonl import write_jsonl
from seechat.data.pairs import IMAGE_EXTS


def _png(size=(48, 40), colour=(200, 30, 30), mode="RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, colour).save(out, "PNG")
    return out.getvalue()


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    (folder / "img0.png").write_bytes(_png())
    (folder / "sub" / "img1.PNG").write_bytes(_png(colour=(0, 0, 200)))
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder


def test_one_extension_list_matches_the_accepted_formats() -> None:
    formats = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP", "gif": "GIF"}
    assert {formats[e.removeprefix(".")] for e in IMAGE_EXTENSIONS} == set(IMAGE_FORMATS)
    assert IMAGE_EXTS == tuple(e[1:] for e in IMAGE_EXTENSIONS)  # the training reader's member names


def test_folder_source(image_dir: Path) -> None:
    src = open_image_source(image_dir)
    assert isinstance(src, FolderImages) and src.ids == ["broken.png", "img0.png", "sub/img1.PNG"]
    assert src.load("sub/img1.PNG").getpixel((0, 0)) == (0, 0, 200)
    with pytest.raises(ImageError, match="broken.png"):  # errors name the file
        src.load("broken.png")
    assert is_image_file(image_dir / "sub" / "img1.PNG") and not is_image_file(image_dir / "notes.txt")


def test_jsonl_and_text_lists_resolve_against_their_folder_or_the_root(
    image_dir: Path, tmp_path: Path
) -> None:
    listing = write_jsonl(
        tmp_path / "list.jsonl", [{"image": "images/img0.png"}, {"image": "images/img0.png"}]
    )
    assert listing == 2
    src = open_image_source(tmp_path / "list.jsonl")
    assert isinstance(src, JsonlImages) and src.ids == ["images/img0.png"] * 2  # duplicates kept
    assert src.load("images/img0.png").size == (48, 40)
    (tmp_path / "test").mkdir()  # mini-world layout: lists in test/, paths relative to the world root
    write_jsonl(tmp_path / "test" / "list.jsonl", [{"image": "images/img0.png", "id": "x"}])
    assert open_image_source(tmp_path / "test" / "list.jsonl", image_root=tmp_path).load("images/img0.png")
    with pytest.raises(ImageError, match="no such file"):  # default root: the list's own folder
        open_image_source(tmp_path / "test" / "list.jsonl").load("images/img0.png")
    write_jsonl(tmp_path / "bad.jsonl", [{"path": "x.png"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        JsonlImages(tmp_path / "bad.jsonl")

    (tmp_path / "list.txt").write_text("# held-out\nimages/img0.png\n\n images/sub/img1.PNG \n")
    text = open_image_source(tmp_path / "list.txt")
    assert isinstance(text, TextListImages) and text.ids == ["images/img0.png", "images/sub/img1.PNG"]
    assert text.load("images/sub/img1.PNG").mode == "RGB"
    files = FileImages([image_dir / "img0.png"])
    assert files.ids == [str(image_dir / "img0.png")] and files.load(files.ids[0]).size == (48, 40)


def test_shard_source_reads_without_webdataset_and_opens_like_everything_else(tmp_path: Path) -> None:
    shard = tmp_path / "heldout-00000.tar"
    with wds.TarWriter(str(shard)) as sink:  # written by the webdataset library: the layout's reference
        sink.write({"__key__": "000000", "jpg": _png(), "txt": "红色"})
        sink.write({"__key__": "000001", "txt": "no image member"})
        sink.write({"__key__": "000002", "gif": _png(mode="RGBA", colour=(0, 0, 0, 0)), "txt": "透明"})
    src = open_image_source(str(tmp_path / "heldout-*.tar"))
    assert isinstance(src, ShardImages) and src.ids == ["000000", "000001", "000002"]
    assert src.load("000000").mode == "RGB"  # PNG bytes under .jpg: the format is read from the bytes
    assert src.load("000002").getpixel((0, 0)) == (255, 255, 255)  # transparency on white, as everywhere
    with pytest.raises(ImageError, match="no image member"):
        src.load("000001")
    with pytest.raises(FileNotFoundError):
        open_image_source(str(tmp_path / "missing-*.tar"))
    with pytest.raises(ValueError, match="folder"):
        open_image_source(tmp_path / "captions.csv")


def test_load_image_file_expands_home_and_names_the_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "a.png").write_bytes(_png())
    assert load_image_file("~/a.png").size == (48, 40)
    (tmp_path / "b.png").write_bytes(b"GIF89a nonsense")
    with pytest.raises(ImageError, match=r"b\.png: "):
        load_image_file(tmp_path / "b.png")
