"""Images for inference: safe decoding, content keys, and the image-feature cache.

- `open_image_bytes` decodes untrusted bytes into an RGB PIL image, refusing non-images, corrupt
  data and decompression bombs (the pixel count is read from the header *before* decoding).
- `image_key` names an image by its pixels, so the same picture sent twice — a second turn of a
  chat, another client — is recognised whatever its file name or encoding round-trip.
- `ImageFeatureCache` maps those keys to the bridge's output features (N_tok, D_lm): a multi-turn
  chat never re-encodes an image. An LRU bounded by entry count.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections import OrderedDict

import torch
from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_IMAGE_PIXELS = 40_000_000  # 40 MP: any real photo fits; a decompression bomb does not


class ImageError(ValueError):
    """The bytes are not an image this server will decode; the message says why."""


def open_image_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode untrusted image bytes to RGB, checking the declared size before decoding pixels."""
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # lazy: reads the header only
            w, h = img.size
            if w <= 0 or h <= 0:
                raise ImageError(f"the image declares an empty size {w}x{h}")
            if w * h > max_pixels:
                raise ImageError(
                    f"the image is {w}x{h} = {w * h:,} pixels, more than the limit of {max_pixels:,} "
                    "(a decompression bomb, or simply too large: resize it first)"
                )
            img.load()
            return img.convert("RGB")
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"the image is too large to decode safely (a decompression bomb?): {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"the image data could not be decoded ({type(e).__name__}: {e})") from None


def image_key(image: Image.Image) -> bytes:
    """A 16-byte digest of the image's mode, size and pixels."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
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
