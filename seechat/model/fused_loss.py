"""The LM head and its cross-entropy in one pass, chunk by chunk: the training loss over a large
vocabulary without holding the (K, V) logits.

With Qwen2.5-7B's 152,064-token vocabulary, the logits of K supervised positions are K x 152,064
numbers. The plain path (`lm_head`, then `F.cross_entropy` on a float32 copy) holds about 12 bytes
for each of them at once: the bf16 logits, their float32 copy, the log-softmax it saves for the
backward and the gradients flowing back. For a stage-2 micro-batch with 4,096 supervised tokens
that is 7.0 GiB (measured by benchmarks/bench_fused_loss.py; 1.4 GiB fused), more than every
activation of a checkpointed 7B LM together. Here each chunk of tokens computes its logits, its loss
and, in the same pass, its gradients (d loss / d logits = softmax - one-hot, times the token's
weight); the chunk's logits are freed before the next chunk starts, and the backward only scales
the stored gradients. Peak: one chunk's logits (`CHUNK_ELEMENTS`) and the head's gradient, which the
plain path also makes. The matrix products are the plain path's, and nothing is recomputed.
Liger-Kernel's fused linear cross-entropy and torchtune's chunked loss exist for the same reason.

Not for:
- LMs whose logits are more than `lm_head(decoder(x))`: Cohere's logit scale, Granite's logit
  scaling, Gemma's soft-capping. `FUSED_HEAD_LMS` lists the model types whose causal-LM forward is
  exactly decoder, then head (checked in transformers' code); other LMs keep the plain path.
- A head that is itself a LoRA layer or a peft copy (`modules_to_save`): only a plain `nn.Linear`
  is fused.
- A second backward through the same graph (`retain_graph=True`): the gradients are made once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from seechat.data.conversation import IGNORE_INDEX

# Logits per chunk: 128 MiB in float32, i.e. 220 tokens of a 152,064-token vocabulary at a time (a
# product of 220 x 3,584 x 152,064 still fills a GPU); the mini LM's 393-token vocabulary: all at once.
CHUNK_ELEMENTS = 1 << 25

# Explicit registry: LM model types whose `ForCausalLM.forward` computes logits = lm_head(last hidden
# state) and nothing more (transformers 5: qwen2, qwen3, llama, mistral, glm, glm4 modeling files).
FUSED_HEAD_LMS = frozenset({"glm", "glm4", "llama", "mistral", "qwen2", "qwen3"})


def chunk_tokens(vocab: int) -> int:
    """Tokens per chunk for a vocabulary of this size."""
    return max(1, CHUNK_ELEMENTS // vocab)


def fused_head(lm: nn.Module) -> nn.Linear | None:
    """The LM's output layer when its loss can be fused (see the module docstring), else None."""
    if lm.config.get_text_config().model_type not in FUSED_HEAD_LMS:
        return None
    head = lm.get_output_embeddings()
    return head if isinstance(head, nn.Linear) else None


def head_cross_entropy(
    hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """sum over k of weights[k] * cross_entropy(head(hidden[k]), targets[k]), in float32, without the
    (K, V) logits. hidden (K, H); targets (K,) with -100 for an ignored token; weights (K,) float, 0
    where ignored. Same value and gradients as the plain path, up to rounding."""
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, head.weight, head.bias)
    ):
        return _HeadCrossEntropy.apply(hidden, head.weight, head.bias, targets, weights)
    with torch.no_grad():  # evaluation: the loss alone, chunk by chunk
        return _chunks(hidden, head.weight, head.bias, targets, weights, (False, False, False))[0]


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, weights):
        loss, *grads = _chunks(hidden, weight, bias, targets, weights, ctx.needs_input_grad[:3])
        ctx.grads = grads
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError(
                "the fused LM-head loss gives its gradients once; a second backward through the same "
                "graph (retain_graph=True) needs train.fused_loss=false"
            )
        grads, ctx.grads = ctx.grads, None
        # the stored gradients are d(sum)/d(input); the chain rule scales them by d(loss)/d(sum)
        scaled = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads]
        return *scaled, None, None


def _chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    weights: torch.Tensor,
    need: tuple[bool, ...],
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The summed loss and, where `need` (hidden, weight, bias) asks, its gradients."""
    need_h, need_w, need_b = need[0], need[1], need[2] and bias is not None
    # The products run in the dtype the plain path's would: autocast's when it is on, else the head's.
    kind = hidden.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros_like(weight) if need_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
    step = chunk_tokens(weight.shape[0])
    with torch.autocast(kind, enabled=False):
        for s in range(0, hidden.shape[0], step):
            h = hidden[s : s + step].to(dtype)  # (c, H)
            t = targets[s : s + step].clamp(min=0)  # (c,); an ignored token has weight 0
            c = weights[s : s + step].float()  # (c,)
            logits = F.linear(h, w, b).float()  # (c, V)
            lse = logits.logsumexp(-1)  # (c,)
            rows = torch.arange(len(t), device=t.device)
            total += ((lse - logits[rows, t]) * c).sum()
            if not (need_h or need_w or need_b):
                continue
            g = logits.sub_(lse[:, None]).exp_().mul_(c[:, None])  # softmax x weight, in place (c, V)
            g[rows, t] -= c
            if need_b:
                grad_b += g.sum(0)
            g = g.to(dtype)
            if need_h:
                grad_h[s : s + step] = g @ w
            if need_w:
                if grad_w.dtype == dtype:
                    grad_w.addmm_(g.t(), h)  # no (V, H) temporary
                else:  # a float32 head under autocast: bf16 products, float32 sum
                    grad_w += g.t() @ h
    return total, grad_h, grad_w, None if grad_b is None else grad_b.to(bias.dtype)


def supervised_tokens(
    hidden: torch.Tensor, labels: torch.Tensor, loss_weights: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hidden states that predict a supervised token, those tokens, and their weights.
    hidden (B, T, H), labels (B, T), loss_weights (B, T) or None -> (K, H), (K,), (K,)."""
    mask = labels[:, 1:] != IGNORE_INDEX  # (B, T-1): position t predicts label t+1
    targets = labels[:, 1:][mask]
    weights = (
        torch.ones(targets.shape, dtype=torch.float32, device=targets.device)
        if loss_weights is None
        else loss_weights[:, 1:][mask].float()
    )
    return hidden[:, :-1][mask], targets, weights
