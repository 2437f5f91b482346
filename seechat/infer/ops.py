"""Tensor functions the hand-written decode steps share (`seechat.infer.runner`'s fast step and
`seechat.infer.static_decode`): RMSNorm as transformers computes it, and rotary embedding."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm exactly as the transformers Llama/Qwen modules compute it (float32 statistics)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm_fp32(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm` for float32 inputs: the same operations in the same order (bit-identical), minus
    the dtype round trips, with the small statistics tensor updated in place. Fewer ops per step."""
    return x * x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_() * weight


def norm_params(norm: torch.nn.Module | None) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of a transformers RMSNorm module; None for no module."""
    return None if norm is None else (norm.weight, norm.variance_epsilon)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """A rotary sin table (..., D) with the first half of each row negated: the table `rope` takes."""
    sign = torch.ones(sin.shape[-1], dtype=sin.dtype, device=sin.device)
    sign[: sin.shape[-1] // 2] = -1
    return sin * sign


def rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half form) with precomputed tables broadcastable to x, in four
    element-wise kernels: rotate_half(x) is x rolled by half the head with that half negated, and
    the sign lives in `sin_signed` (`signed_sin`), so the products are exactly transformers'
    x * cos + rotate_half(x) * sin."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed
