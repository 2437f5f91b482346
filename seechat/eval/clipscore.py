"""CLIPScore and RefCLIPScore (Hessel et al., 2021) from precomputed embeddings.

What this module is: the two formulas, vectorised over a batch of candidates:

- CLIPScore(c, v)      = w · max(cos(c, v), 0), with w = 2.5;
- RefCLIPScore(c, R, v) = harmonic mean of CLIPScore(c, v) and max(max_{r ∈ R} cos(c, r), 0)
  (0 when both terms are 0).

Embeddings need not be normalised (they are normalised here); get them from
:class:`seechat.data.scorer.ChineseClipScorer`.

What it is not: an embedding model, and not the paper's reference implementation with
OpenAI CLIP and its "A photo depicts" prompt — scores from a Chinese-CLIP are on their own scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["CLIPSCORE_WEIGHT", "clip_score", "ref_clip_score"]

CLIPSCORE_WEIGHT = 2.5  # w in the paper: stretches typical cosines (~0.2–0.4) toward [0, 1]


def clip_score(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, *, w: float = CLIPSCORE_WEIGHT
) -> torch.Tensor:
    """CLIPScore of aligned pairs: (N, D) images, (N, D) captions -> (N,)."""
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"embedding shapes differ: {tuple(image_embeds.shape)} vs {tuple(text_embeds.shape)}"
        )
    cos = F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)  # (N,)
    return w * cos.clamp(min=0)


def ref_clip_score(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    ref_embeds: Sequence[torch.Tensor],
    *,
    w: float = CLIPSCORE_WEIGHT,
) -> torch.Tensor:
    """RefCLIPScore: (N, D) images, (N, D) captions, N tensors of (R_i, D) references -> (N,)."""
    if len(ref_embeds) != len(text_embeds):
        raise ValueError(f"{len(text_embeds)} captions but {len(ref_embeds)} reference sets")
    if any(len(refs) == 0 for refs in ref_embeds):
        raise ValueError("every caption needs at least one reference embedding")
    image_term = clip_score(image_embeds, text_embeds, w=w)  # (N,)
    refs = F.normalize(torch.cat(list(ref_embeds)).float(), dim=-1)  # (sum R_i, D)
    owner = torch.repeat_interleave(torch.tensor([len(r) for r in ref_embeds]))  # (sum R_i,)
    cos = (F.normalize(text_embeds.float(), dim=-1)[owner] * refs).sum(-1)  # (sum R_i,)
    best = torch.full((len(text_embeds),), -1.0).scatter_reduce(
        0, owner, cos, reduce="amax", include_self=False
    )
    ref_term = best.clamp(min=0)  # (N,)
    denom = image_term + ref_term
    return torch.where(denom > 0, 2 * image_term * ref_term / denom.clamp(min=1e-12), torch.zeros_like(denom))
