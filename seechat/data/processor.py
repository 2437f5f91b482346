"""The processor: conversations + images -> token ids, labels and pixel values.

Each `<image>` marker in a message is one reserved image token after tokenisation; the processor
expands it to `num_image_tokens` copies (the bridge's output length), so the model can merge image
features with a single `masked_scatter`. Labels are -100 everywhere except assistant replies.
Message content is a string with markers, or transformers' list of parts (`{"type": "image"}`,
`{"type": "text", ...}`; see `seechat.data.conversation.text_messages`), whose image parts may
carry the image itself (`"image": PIL.Image`) instead of it being passed in `images`.

It pairs a tokenizer (the LLM's own, with the image token added when missing) and an image
processor (the vision encoder's own). It does not batch; `seechat.data.collate` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer

from seechat.data.conversation import (
    IGNORE_INDEX,
    NoSupervisedTokensError,
    ensure_chat_template,
    part_images,
    render_with_spans,
    text_messages,
    tokenize_prompt,
    tokenize_with_labels,
)


@dataclass
class Encoded:
    input_ids: torch.Tensor  # (T,) long
    labels: torch.Tensor | None  # (T,) long, -100 where not supervised; None for prompts
    pixel_values: torch.Tensor | None  # (n_images, 3, H, W)


class SeeChatProcessor:
    def __init__(
        self,
        tokenizer: Any,
        image_processor: Any,
        num_image_tokens: int,
        image_token: str = "<image>",
        max_length: int = 2048,
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        self.max_length = max_length
        if image_token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
        ensure_chat_template(tokenizer)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.image_token_id: int = tokenizer.convert_tokens_to_ids(image_token)
        if len(tokenizer(image_token, add_special_tokens=False)["input_ids"]) != 1:
            raise ValueError(f"image marker {image_token!r} must tokenize to one token")

    # ------------------------------------------------------------------ images

    def preprocess_images(self, images: Sequence[Image.Image]) -> torch.Tensor | None:
        """PIL images -> (n, 3, H, W) float pixel values, or None for no images."""
        if not images:
            return None
        rgb = [im.convert("RGB") for im in images]
        return self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]

    # ------------------------------------------------------------------ text

    def _expand(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        out_ids: list[int] = []
        out_labels: list[int] = []
        for t, lab in zip(ids, labels, strict=True):
            if t == self.image_token_id:
                out_ids.extend([t] * self.num_image_tokens)
                out_labels.extend([IGNORE_INDEX] * self.num_image_tokens)
            else:
                out_ids.append(t)
                out_labels.append(lab)
        return out_ids, out_labels

    def _as_text(
        self, messages: Sequence[dict[str, Any]], images: Sequence[Image.Image]
    ) -> tuple[list[dict[str, str]], list[Image.Image]]:
        """String-content messages, and the images: those passed, or those the image parts carry."""
        carried = part_images(messages)
        if carried and images:
            raise ValueError(
                "images were passed both inside the content parts and as `images`; pass them one way"
            )
        return text_messages(messages, self.image_token), list(carried or images)

    def _check_markers(self, messages: Sequence[dict[str, str]], n_images: int) -> None:
        n_markers = sum(m["content"].count(self.image_token) for m in messages)
        if n_markers != n_images:
            raise ValueError(
                f"the conversation has {n_markers} {self.image_token} marker(s) but {n_images} image(s); "
                "put one marker where each image belongs"
            )

    def _truncate(self, ids: list[int], labels: list[int], n_images: int) -> tuple[list[int], list[int], int]:
        """Cut to max_length, never through an image block; returns how many images survive."""
        if len(ids) <= self.max_length:
            return ids, labels, n_images
        cut = self.max_length
        kept = ids[:cut]
        n_tok = sum(1 for t in kept if t == self.image_token_id)
        partial = n_tok % self.num_image_tokens
        if partial:
            cut -= partial  # the last image block was cut: drop it whole
        return ids[:cut], labels[:cut], n_tok // self.num_image_tokens

    def encode_conversation(
        self, messages: Sequence[dict[str, Any]], images: Sequence[Image.Image] = (), sample_id: str = ""
    ) -> Encoded:
        """A training sample: ids, labels (assistant replies only) and pixel values."""
        messages, images = self._as_text(messages, images)
        self._check_markers(messages, len(images))
        text, spans = render_with_spans(self.tokenizer, messages)
        ids, labels = tokenize_with_labels(self.tokenizer, text, spans)
        ids, labels = self._expand(ids, labels)
        ids, labels, n_img = self._truncate(ids, labels, len(images))
        if spans and all(lab == IGNORE_INDEX for lab in labels):
            raise NoSupervisedTokensError(
                f"sample {sample_id or '?'}: no assistant token is supervised after rendering with the "
                f"chat template and truncating to max_length={self.max_length} "
                f"({len(ids)} tokens kept). Either the replies were truncated away (raise "
                "model.max_length) or the tokenizer's chat template does not match this LLM"
            )
        return Encoded(
            input_ids=torch.tensor(ids, dtype=torch.long),
            labels=torch.tensor(labels, dtype=torch.long),
            pixel_values=self.preprocess_images(list(images)[:n_img]),
        )

    def prompt_ids(self, messages: Sequence[dict[str, Any]], n_images: int) -> torch.Tensor:
        """Token ids of the conversation so far plus the generation prompt, image markers
        expanded; no pixels are touched (a serving engine encodes only images it has not seen).
        Control tokens typed in message text (`<|im_end|>` ...) are encoded as plain text: only
        the chat template and the image markers produce special ids (`tokenize_prompt`). (T,)"""
        messages = text_messages(messages, self.image_token)
        self._check_markers(messages, n_images)
        ids = tokenize_prompt(self.tokenizer, messages, add_generation_prompt=True, keep=(self.image_token,))
        ids, _ = self._expand(ids, [IGNORE_INDEX] * len(ids))
        return torch.tensor(ids, dtype=torch.long)

    def encode_prompt(
        self, messages: Sequence[dict[str, Any]], images: Sequence[Image.Image] = ()
    ) -> Encoded:
        """An inference prompt: the conversation so far plus the assistant generation prompt."""
        messages, images = self._as_text(messages, images)
        return Encoded(self.prompt_ids(messages, len(images)), None, self.preprocess_images(images))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @property
    def stop_token_ids(self) -> list[int]:
        """Tokens that end an assistant turn: eos, plus the template's own end-of-turn token.

        The end-of-turn token is read off the template itself — the last supervised token of a
        rendered one-turn reply — rather than guessed from a list of known names.
        """
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        text, spans = render_with_spans(self.tokenizer, probe)
        ids, labels = tokenize_with_labels(self.tokenizer, text, spans)
        supervised = [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
        stops = {self.tokenizer.eos_token_id, supervised[-1] if supervised else None}
        return sorted(i for i in stops if i is not None)

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, directory: str | Path) -> None:
        d = Path(directory)
        self.tokenizer.save_pretrained(d / "tokenizer")
        self.image_processor.save_pretrained(d / "image_processor")

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        num_image_tokens: int,
        image_token: str = "<image>",
        max_length: int = 2048,
    ) -> SeeChatProcessor:
        d = Path(directory)
        return cls(
            AutoTokenizer.from_pretrained(d / "tokenizer"),
            AutoImageProcessor.from_pretrained(d / "image_processor"),
            num_image_tokens=num_image_tokens,
            image_token=image_token,
            max_length=max_length,
        )
