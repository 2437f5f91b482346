"""Image sources: a set of images with ids, each loaded on demand (captioning, win rate, evaluation).

- `FolderImages(root)`: every image file under `root` (recursively, by `IMAGE_EXTENSIONS`); ids are
  POSIX paths relative to `root`.
- `JsonlImages(path, image_root)`: ``{"image": path, ...}`` rows; ids are the paths as written,
  relative ones resolved against `image_root` (default: the JSONL file's folder).
- `TextListImages(path, image_root)`: a ``.txt`` list of paths, one per line (``#`` comments);
  ids as written, resolved like JSONL.
- `FileImages(paths)`: image files given one by one; ids are the paths as given.
- `ShardImages(urls)`: webdataset tar shards (img2dataset layout); ids are the sample keys. The
  encoded bytes are held in memory: meant for held-out evaluation shards, not a training corpus.
- `open_image_source(spec)`: the source a folder, ``*.jsonl``, ``*.txt`` or shard spec names.

Every source opens images with `seechat.data.images.load_image_file` (accepted formats, size limit,
EXIF, transparency on white), the way serving and training do, and reads shards through
`seechat.data.shards`. Duplicate ids stay in `ids` (the win rate reports them). What this module
is not: the training-time shard dataset (`seechat.data.pairs`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from PIL import Image

from seechat.data.images import IMAGE_EXTENSIONS, ImageError, load_image, load_image_file
from seechat.data.jsonl import enumerate_jsonl
from seechat.data.shards import expand_shards, iter_tar_samples

PathLike = str | os.PathLike[str]


class ImageSource(Protocol):
    """Anything with image ids and a way to load one of them (raises on an unreadable image)."""

    ids: list[str]

    def load(self, image_id: str) -> Image.Image: ...


def is_image_file(path: PathLike) -> bool:
    """A file whose extension is one of `IMAGE_EXTENSIONS` (any case)."""
    p = Path(path)
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS


class FolderImages:
    """Every image file under ``root`` (recursively, by extension); ids are POSIX paths relative to root."""

    def __init__(self, root: PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise NotADirectoryError(f"image folder {self.root} does not exist")
        files = (p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        self.ids = sorted(p.relative_to(self.root).as_posix() for p in files)

    def load(self, image_id: str) -> Image.Image:
        return load_image_file(self.root / image_id)


class JsonlImages:
    """Images listed one per line as ``{"image": path, ...}``; ids are the paths as written.
    Relative paths are resolved against ``image_root`` (default: the JSONL file's folder), as in
    ``seechat.data``."""

    def __init__(self, path: PathLike, image_root: PathLike | None = None) -> None:
        self.path = Path(path)
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.ids: list[str] = []
        for line_no, row in enumerate_jsonl(self.path):
            if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                raise ValueError(f'{self.path}:{line_no}: expected {{"image": path}}, got {str(row)[:80]!r}')
            self.ids.append(row["image"])

    def load(self, image_id: str) -> Image.Image:
        return load_image_file(self.image_root / image_id)  # an absolute image_id replaces the root


class TextListImages:
    """A ``.txt`` list of image paths, one per line (blank lines and ``#`` comments skipped); ids as
    written, relative paths against ``image_root`` (default: the list's folder)."""

    def __init__(self, path: PathLike, image_root: PathLike | None = None) -> None:
        path = Path(path)
        self.image_root = Path(image_root) if image_root is not None else path.parent
        lines = path.read_text(encoding="utf-8").splitlines()
        self.ids = [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]

    def load(self, image_id: str) -> Image.Image:
        return load_image_file(self.image_root / image_id)


class FileImages:
    """Image files named one by one; ids are the paths as given."""

    def __init__(self, paths: Sequence[PathLike]) -> None:
        self.ids = [str(p) for p in paths]

    def load(self, image_id: str) -> Image.Image:
        return load_image_file(image_id)


class ShardImages:
    """Images in webdataset tar shards (img2dataset layout: ``key.jpg`` next to ``key.txt``); ids are
    the sample keys, the image member is the first of `IMAGE_EXTENSIONS` a sample has."""

    def __init__(self, urls: PathLike | Sequence[PathLike]) -> None:
        self.ids: list[str] = []
        self._encoded: dict[str, bytes] = {}
        for shard in expand_shards(urls):
            for key, members in iter_tar_samples(shard):
                self.ids.append(key)
                ext = next((e for e in IMAGE_EXTENSIONS if isinstance(members.get(e[1:]), bytes)), None)
                if ext is not None and key not in self._encoded:
                    self._encoded[key] = members[ext[1:]]  # type: ignore[assignment]

    def load(self, image_id: str) -> Image.Image:
        if image_id not in self._encoded:
            raise ImageError(f"sample {image_id!r} has no image member ({', '.join(IMAGE_EXTENSIONS)})")
        try:
            return load_image(self._encoded[image_id])
        except ImageError as e:
            raise ImageError(f"sample {image_id!r}: {e}") from None


def open_image_source(spec: PathLike, *, image_root: PathLike | None = None) -> ImageSource:
    """A folder → :class:`FolderImages`; ``*.jsonl`` → :class:`JsonlImages` and ``*.txt`` →
    :class:`TextListImages` (with ``image_root``); ``*.tar``, a brace pattern
    (``shards/{00000..00009}.tar``) or a glob (``shards/*.tar``) → :class:`ShardImages`."""
    text = str(spec)
    if Path(text).is_dir():
        return FolderImages(text)
    if text.endswith(".jsonl"):
        return JsonlImages(text, image_root)
    if text.endswith(".txt"):
        return TextListImages(text, image_root)
    if "*" in text or "?" in text or text.endswith(".tar") or "{" in text:
        return ShardImages(text)
    raise ValueError(
        f"cannot read images from {text!r}: give a folder, a .jsonl or .txt list, or .tar shard(s)"
    )
