"""Padding-free ("varlen") attention for the language model: one flat row of several sequences.

A padding-free batch (`seechat.data.collate.collate_padding_free`, `train.padding_free`) is the
micro-batch's samples laid end to end in one row of N tokens, with position ids restarting at 0
for each sample and the boundaries in `cu_seq_lens` (S + 1,) int32 — the layout of FlashAttention's
varlen kernels and of transformers' `FlashAttentionKwargs` (`cu_seq_lens_q/k`, `max_length_q/k`).
Every projection, MLP and norm then runs on exactly the N real tokens, not on S x (longest) with
the padding; only attention must keep the samples apart, and this module is an attention that does.

Any transformers attention computes a padding-free row correctly: the model sees the position ids
restart and builds a block-diagonal causal mask. For `sdpa` and `eager` that mask is (N, N) and the
attention is computed over all N x N pairs, most of them masked: at 32 samples of ~130 tokens, 32x
the attention of the padded batch. `VARLEN_ATTENTION` ("seechat_varlen") avoids both. It is
registered with transformers' `AttentionInterface` (the public registry of attention functions) by
`use_varlen_attention(lm)`, which switches an `sdpa` or `eager` LM to it. A call that carries
`cu_seq_lens_q` is padding-free:
  * on CUDA, in bf16/fp16, with torch's `varlen_attn` (FlashAttention over the flat row: no
    padding anywhere, no mask materialised);
  * otherwise (CPU, fp32, older torch) the flat q/k/v are scattered into a right-padded (S, H, L, D)
    block — one vectorised index, no per-sample loop — and one causal SDPA runs over it
    (`is_causal`: no mask is built; a real query never sees a padded key because the padding comes
    after it). Only attention pays for padding here; its share of a step is small.
A call without it (an ordinary padded batch, generation with a KV cache) is plain SDPA with the mask
transformers builds: the LM stays fully usable after the switch. A `flash_attention_2` LM is left as
it is: transformers' FlashAttention path reads the same kwargs natively.

What it is not: packing (filling fixed-length rows with several samples and changing what a
micro-batch holds). A padding-free batch holds exactly the samples of the padded one, so the
objective and the data order are unchanged; only where the padding went differs.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

VARLEN_ATTENTION = "seechat_varlen"
SWITCHABLE = ("sdpa", "eager")  # use_varlen_attention moves these to VARLEN_ATTENTION


def varlen_kwargs(cu_seq_lens: torch.Tensor, max_seq_len: int = 0) -> dict:
    """The LM call's keyword arguments for a padding-free row (transformers' FlashAttentionKwargs);
    `max_seq_len` 0: read it from the boundaries."""
    max_seq_len = max_seq_len or int(cu_seq_lens.diff().max())
    return {
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": max_seq_len,
        "max_length_k": max_seq_len,
    }


def sequence_ids(cu_seq_lens: torch.Tensor) -> torch.Tensor:
    """Which sequence each position of a padding-free row belongs to: [0, 0, 1, 1, 1, 2] for
    lengths 2, 3, 1. (N,) long, on cu_seq_lens' device"""
    lengths = cu_seq_lens.diff().long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # (1, H, N, D)
    key: torch.Tensor,  # (1, H_kv, N, D)
    value: torch.Tensor,  # (1, H_kv, N, D)
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature -> ((B, N, H, D), None)."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:  # not padding-free: an ordinary batch or a decode step
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if sliding_window is not None:
        raise ValueError(
            f"{VARLEN_ATTENTION} has no sliding-window attention (use_varlen_attention skips such LMs)"
        )
    if query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        raise ValueError(
            "a padding-free batch is one row of queries and keys alike (no KV cache), "
            f"not queries {tuple(query.shape)}"
        )
    max_len = int(kwargs.get("max_length_q") or cu.diff().max())  # given by varlen_kwargs
    if _flash_varlen_usable(query, key, value, dropout):
        out = _flash_varlen(query, key, value, cu, max_len, scaling)
    else:
        out = _padded_causal(query, key, value, cu, max_len, scaling, dropout)
    return out.unsqueeze(0), None


def _flash_varlen_usable(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float) -> bool:
    """FlashAttention takes half-precision q, k, v of one dtype (under autocast with fp32 weights the
    rotary embedding can leave q and k in fp32: those go the padded SDPA way, which autocast casts)."""
    return (
        query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and key.dtype == value.dtype == query.dtype
        and dropout == 0.0
        and _flash_capable(query.device.index or 0)
        and _torch_varlen_attn() is not None
    )


@lru_cache(maxsize=8)
def _flash_capable(device_index: int) -> bool:
    """FlashAttention 2 needs an Ampere or newer GPU (compute capability 8.0+)."""
    return torch.cuda.get_device_capability(device_index)[0] >= 8


@lru_cache(maxsize=1)
def _torch_varlen_attn():
    """torch's varlen_attn and the parameters it takes, or None (torch before 2.10, or one whose
    varlen_attn cannot be asked for causal attention)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" not in params and "is_causal" not in params:
        return None
    return varlen_attn, params


def _flash_varlen(q, k, v, cu, max_len, scaling) -> torch.Tensor:
    """torch's FlashAttention varlen kernel over the flat row. -> (N, H, D)"""
    varlen_attn, params = _torch_varlen_attn()
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (q, k, v))  # (N, H, D), as FlashAttention reads it
    # torch 2.10 spelled causal `is_causal=True`; later versions a (left, right) window
    extra: dict = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if scaling is not None and "scale" in params:
        extra["scale"] = scaling
    elif scaling is not None and abs(scaling - q.shape[-1] ** -0.5) > 1e-6:
        raise ValueError(f"this torch's varlen_attn has no `scale`; the LM needs {scaling}")
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:  # give every query head its own copy of its key/value head
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    cu = cu.to(torch.int32)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **extra)


def _padded_causal(q, k, v, cu, max_len, scaling, dropout) -> torch.Tensor:
    """The flat row's sequences right-padded into one (S, H, L, D) batch, causal SDPA over it, and
    the real positions gathered back. -> (N, H, D)"""
    n, lengths = q.shape[2], cu.diff().long()
    seq = sequence_ids(cu).to(q.device)  # (N,)
    offset = torch.arange(n, device=q.device) - cu[:-1].long()[seq]  # (N,) position inside its sequence

    def padded(x: torch.Tensor) -> torch.Tensor:  # (1, H, N, D) -> (S, H, L, D), zeros after each end
        block = x.new_zeros(lengths.numel(), max_len, x.shape[1], x.shape[3])
        block[seq, offset] = x[0].transpose(0, 1)
        return block.transpose(1, 2)

    out = F.scaled_dot_product_attention(
        padded(q),
        padded(k),
        padded(v),
        is_causal=True,
        dropout_p=dropout,
        scale=scaling,
        enable_gqa=k.shape[1] != q.shape[1],
    )  # (S, H, L, D)
    return out.transpose(1, 2)[seq, offset]  # (N, H, D)


def _varlen_mask(
    *, q_length: int, kv_length: int, attention_mask: torch.Tensor | None = None, **kwargs
) -> torch.Tensor | None:
    """The mask transformers builds for VARLEN_ATTENTION: none for an unpadded call without a cache
    (a padding-free row, whose sequences cu_seq_lens keeps apart, or one plain sequence: causal
    either way), otherwise exactly SDPA's (a padded batch, a chunk continuing a KV cache)."""
    if attention_mask is None and q_length == kv_length:
        return None
    return sdpa_mask(q_length=q_length, kv_length=kv_length, attention_mask=attention_mask, **kwargs)


def register() -> None:
    """Make VARLEN_ATTENTION known to transformers (idempotent)."""
    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _varlen_mask)


def _has_sliding_window(config) -> bool:
    """Whether some layer attends within a sliding window (transformers' `layer_types`), which
    VARLEN_ATTENTION does not implement."""
    return "sliding_attention" in (getattr(config, "layer_types", None) or ())


def use_varlen_attention(lm: PreTrainedModel) -> str:
    """Let `lm` run padding-free rows without an (N, N) mask: an `sdpa` or `eager` LM switches to
    VARLEN_ATTENTION; any other stays as it is (`flash_attention_2` reads cu_seq_lens itself, the
    rest, and an LM with sliding-window layers, through transformers' block-diagonal mask: correct,
    slower). -> the implementation now in use."""
    current = lm.config._attn_implementation
    if current in SWITCHABLE and not _has_sliding_window(lm.config):
        register()
        lm.set_attn_implementation(VARLEN_ATTENTION)
        return VARLEN_ATTENTION
    return current
