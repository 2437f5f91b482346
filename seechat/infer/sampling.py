"""Sampling: how the next token is picked from the logits, for every decoder of the project.

`SamplingParams` are one request's settings; `sample_next` picks the next token ids of a batch:
greedy (temperature below `GREEDY_BELOW`), or temperature with top-k and top-p, from an optional
seeded generator; `apply_repetition_penalty` is the CTRL-style penalty applied before it;
`speculative_sample` keeps or replaces drafted tokens so that sampling stays exact. The
simple generator (`seechat.infer.generate`), the serving engine and its requests
(`seechat.infer.engine`, `seechat.infer.request`) and the HTTP protocol (`seechat.serve.protocol`)
all use this module. What it is not: a decoding loop (no model, no KV cache here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already in `seen` (B, S); logits (B, V)."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(1, seen, picked)


GREEDY_BELOW = 1e-5  # temperatures under this sample greedily: the T -> 0 limit of softmax(l / T)


def sample_next(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,).

    Numerically safe for every temperature >= 0: the logits are shifted so that their maximum is 0
    before dividing, so l / T is never +inf (a tiny T once gave inf / inf = NaN probabilities and a
    crash in `torch.multinomial`); T below GREEDY_BELOW is greedy, the limit the distribution tends
    to. Non-finite logits from the model still raise: the caller fails that request alone."""
    if params.temperature < GREEDY_BELOW:
        return logits.argmax(-1)
    return torch.multinomial(next_token_probs(logits, params), 1, generator=generator).squeeze(1)


def next_token_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution `sample_next` draws from (temperature >= GREEDY_BELOW): logits (B, V) ->
    probabilities (B, V) after temperature, top-k and top-p."""
    logits = logits.float()
    logits = (logits - logits.max(-1, keepdim=True).values) / params.temperature  # <= 0, max exactly 0
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > params.top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return logits.softmax(-1)


def speculative_sample(
    probs: torch.Tensor, drafts: list[int], generator: torch.Generator | None = None
) -> list[int]:
    """Speculative sampling with deterministic drafts (Leviathan et al., 2023; Chen et al., 2023,
    with the draft distribution a point mass): `probs` (1 + k, V) are the target distributions at
    the k drafts' positions and one after. Draft i is kept with probability p_i(draft); the first
    one refused is replaced by a sample of p_i with the draft's mass removed (renormalised), and
    if all are kept one more token is drawn from p_k. Each returned token has exactly the
    distribution plain sampling would give it. -> the kept drafts plus one token."""
    out: list[int] = []
    for i, d in enumerate(drafts):
        p = probs[i]
        if float(torch.rand((), generator=generator)) < float(p[d]):
            out.append(d)
            continue
        rest = p.clone()
        rest[d] = 0.0
        total = float(rest.sum())
        if total <= 0.0:  # p(d) rounds to 1 yet the draw refused it: keep the draft
            out.append(d)
            continue
        out.append(int(torch.multinomial(rest / total, 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(probs[len(drafts)], 1, generator=generator)))
    return out
