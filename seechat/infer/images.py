"""Images inside the serving engine: content keys and the image-feature cache.

Images reach the engine already opened (`seechat.data.images.load_image`: accepted formats, size
limits, EXIF, alpha on white) and preprocessed to the vision tower's pixel values
(`SeeChatProcessor.preprocess_images`) on the caller's thread, so the engine thread never decodes
or resizes, and a waiting request holds (3, H, W) floats per image rather than a full-size photo.

- `pixel_key` names an image by its pixel values (and the cache scope it belongs to), so the same
  picture sent twice — a second turn of a chat — is recognised whatever its file name or encoding.
- `ImageFeatureCache` maps those keys to the bridge's output features (N_tok, D_lm): a multi-turn
  chat never re-encodes an image. An LRU bounded by entry count.
- `load_image_file` opens an image file for the callers that read files (chat, captioning,
  evaluation), through the same hardened decoder as the server (`seechat.data.images.load_image`).
  It moves to `seechat.data.images` with the one-home-per-format work (branch i15-io).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

import torch
from PIL import Image

from seechat.data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, load_image


def pixel_key(pixels: torch.Tensor, scope: str = "") -> bytes:
    """A 16-byte digest of one image's pixel values (3, H, W) within a cache `scope` (two scopes
    never share a key, so they never share cached features)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{scope}\0{pixels.dtype}:{tuple(pixels.shape)}:".encode())
    h.update(pixels.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.digest()


def key_tag(key: bytes) -> int:
    """A negative int standing for an image inside a token-id sequence (never a real token id)."""
    return -1 - int.from_bytes(key[:7], "little")


class ImageFeatureCache:
    """LRU of image key -> features (N_tok, D_lm); counts hits and misses."""

    def __init__(self, max_entries: int = 256):
        self.max_entries = max_entries
        self._items: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: bytes) -> torch.Tensor | None:
        feats = self._items.get(key)
        if feats is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return feats

    def put(self, key: bytes, features: torch.Tensor) -> None:
        if self.max_entries <= 0:
            return
        self._items[key] = features
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)


def load_image_file(path: str | Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB image from a file, prepared exactly as the server and the training readers do
    (`seechat.data.images.load_image`: accepted formats, size limit, EXIF, alpha on white)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ImageError(f"{p}: no such file")
    try:
        return load_image(p.read_bytes(), max_pixels)
    except ImageError as e:
        raise ImageError(f"{p}: {e}") from None
