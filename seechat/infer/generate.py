"""Token generation with a KV cache: prefill once (images merged in), then one token per step.

The generator knows token ids and embeddings, not chat: `stream_generate` yields new token ids
as they are produced (so streaming is free), `generate` collects them for a left-padded batch.
The image token is never sampled. How a token is picked from the logits (greedy, temperature,
top-k, top-p, repetition penalty) is `seechat.infer.sampling`, shared with the serving engine.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from seechat.infer.sampling import SamplingParams, apply_repetition_penalty, sample_next
from seechat.model.modeling import SeeChatModel


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: 0 at each row's first real token. (B, T)"""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.inference_mode()
def stream_generate(
    model: SeeChatModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    params: SamplingParams = SamplingParams(),
    stop_token_ids: Sequence[int] = (),
    image_features: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids (B,) each step; a finished row keeps yielding its stop token."""
    device = model.device
    input_ids = input_ids.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    if image_features is None and pixel_values is not None:
        image_features = model.encode_images(pixel_values.to(device))
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    stops = torch.tensor(list(stop_token_ids) or [-1], device=device)
    positions = positions_from_mask(attention_mask)

    out = model(
        input_ids,
        attention_mask,
        image_features=image_features,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
    )
    seen = input_ids
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
    next_pos = positions[:, -1:] + 1  # (B, 1)
    for _ in range(params.max_new_tokens):
        logits = out.logits[:, -1].float()  # (B, V)
        logits[:, model.image_token_id] = float("-inf")
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
        token = sample_next(logits, params, generator)
        token = torch.where(done, stops[0].clamp(min=0), token)
        yield token
        done |= torch.isin(token, stops)
        if bool(done.all()):
            return
        seen = torch.cat([seen, token[:, None]], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(token[:, None])], dim=1)
        out = model(
            token[:, None],
            attention_mask,
            cache=out.cache,
            position_ids=next_pos,
            use_cache=True,
        )
        next_pos = next_pos + 1


def generate(
    model: SeeChatModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    params: SamplingParams = SamplingParams(),
    stop_token_ids: Sequence[int] = (),
) -> list[list[int]]:
    """New token ids for each row of a left-padded batch, stop token excluded."""
    rows: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    finished = [False] * len(rows)
    stops = set(stop_token_ids)
    for step in stream_generate(model, input_ids, attention_mask, pixel_values, params, stop_token_ids):
        for i, t in enumerate(step.tolist()):
            if finished[i]:
                continue
            if t in stops:
                finished[i] = True
            else:
                rows[i].append(t)
    return rows


@torch.inference_mode()
def generate_without_cache(
    model: SeeChatModel,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    max_new_tokens: int = 16,
    stop_token_ids: Sequence[int] = (),
) -> list[int]:
    """Greedy decoding that recomputes the whole sequence each step (batch 1): the reference the
    KV-cached path is tested against, and nothing else."""
    device = model.device
    ids = input_ids.to(device)
    feats = model.encode_images(pixel_values.to(device)) if pixel_values is not None else None
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(ids, image_features=feats).logits[:, -1].float()
        logits[:, model.image_token_id] = float("-inf")
        t = int(logits.argmax(-1))
        if t in stop_token_ids:
            break
        new.append(t)
        ids = torch.cat([ids, torch.tensor([[t]], device=device)], dim=1)
    return new
