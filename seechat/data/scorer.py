"""Chinese-CLIP image–text relevance scorer.

What this module is: :class:`ChineseClipScorer`, a thin wrapper around a transformers
``ChineseCLIPModel`` with its tokenizer and image processor that turns PIL images and Chinese
texts into L2-normalised embeddings in the shared projection space, in batches under
``torch.inference_mode()``, and scores aligned (image, text) pairs by cosine similarity. It
loads from a local directory (e.g. the mini world's ``runs/mini/experts/clip``) or a hub id
(e.g. ``OFA-Sys/chinese-clip-vit-base-patch16``) — the same code path for both.

What it is not: a trainer, and not CLIPScore itself (see ``seechat.eval.clipscore``, which works
on the embeddings returned here). Embeddings come back as float32 on the CPU whatever the model's
device and dtype, so callers can mix them freely with numpy.

Why it lives in `seechat.data`: the data filter (`seechat.data.filter`) scores pairs with it and
so do the evaluations above (`seechat.eval`, `seechat.mini`); the data layer is the lowest both
can import (arrows only point down, docs/architecture.md). It uses no other seechat module.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, ChineseCLIPModel, PreTrainedTokenizerBase
from transformers.image_processing_utils import BaseImageProcessor

__all__ = ["ChineseClipScorer"]


class ChineseClipScorer:
    """Embed images and texts with a Chinese-CLIP model; score aligned pairs by cosine.

    Build it from parts (``ChineseClipScorer(model, tokenizer, image_processor)``) or from a
    directory / hub id with :meth:`from_pretrained`.
    """

    def __init__(
        self,
        model: ChineseCLIPModel,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: BaseImageProcessor,
        *,
        batch_size: int = 32,
        max_text_length: int | None = None,
        name: str = "chinese-clip",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.batch_size = batch_size
        # Tokenizers saved without a limit report model_max_length = 1e30; the position table is the real cap.
        positions = model.config.text_config.max_position_embeddings
        self.max_text_length = max_text_length or min(positions, tokenizer.model_max_length)
        self.name = name

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
        max_text_length: int | None = None,
    ) -> ChineseClipScorer:
        """Load model, tokenizer and image processor from a local directory or a hub id."""
        model = ChineseCLIPModel.from_pretrained(name_or_path, dtype=dtype).to(device)
        # Separate Auto* loads work for both layouts: a processor_config.json (save_pretrained of a
        # ChineseCLIPProcessor) and the hub's preprocessor_config.json + vocab.txt.
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        image_processor = AutoImageProcessor.from_pretrained(name_or_path)
        return cls(
            model,
            tokenizer,
            image_processor,
            batch_size=batch_size,
            max_text_length=max_text_length,
            name=str(name_or_path),
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised image embeddings, float32 on CPU: N images -> (N, D)."""
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = [image.convert("RGB") for image in images[start : start + self.batch_size]]
            pixels = self.image_processor(images=batch, return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
            chunks.append(out.pooler_output.float().cpu())  # (b, D)
        return self._normalize(chunks)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings, float32 on CPU: N texts -> (N, D)."""
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_text_length,
                return_tensors="pt",
            )
            with torch.inference_mode():
                out = self.model.get_text_features(**{k: v.to(self.device) for k, v in tokens.items()})
            chunks.append(out.pooler_output.float().cpu())  # (b, D)
        return self._normalize(chunks)

    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        """Cosine similarity of each image with its text: N images, N texts -> (N,)."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        return (self.embed_images(images) * self.embed_texts(texts)).sum(dim=-1)

    def _normalize(self, chunks: list[torch.Tensor]) -> torch.Tensor:
        if not chunks:
            return torch.zeros(0, self.model.config.projection_dim)
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)
