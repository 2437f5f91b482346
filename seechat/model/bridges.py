"""Bridges: small learnable modules mapping vision features to LM input embeddings.

Every bridge maps `(B, N_patches, D_vision) -> (B, N_tokens, D_lm)` and reports `num_tokens`, how
many LM tokens one image becomes. They are chosen by name from the explicit `BRIDGES` registry:

- `linear`      MiniGPT-4 style single projection; N_tokens = N_patches.
- `mlp2x_gelu`  LLaVA-1.5 projector (Linear-GELU-Linear); N_tokens = N_patches. Its parameter names
                match transformers' `LlavaMultiModalProjector`, so it exports to the LLaVA layout.
- `qformer`     BLIP-2 style: `num_queries` learned queries pass through `num_layers` blocks of
                self-attention, cross-attention to the patch features and an FFN; the original
                SEEChat bridge. N_tokens = num_queries, independent of image resolution.
- `resampler`   Qwen-VL style: one cross-attention layer from learned queries to the patch features
                (with 2-D sin-cos positions on the keys). N_tokens = num_queries.

The bridge does not know tokens, text or the vision model; it sees tensors only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from seechat.config import BridgeConfig


class LinearBridge(nn.Module):
    def __init__(self, d_vision: int, d_lm: int, num_patches: int, cfg: BridgeConfig):
        super().__init__()
        self.proj = nn.Linear(d_vision, d_lm)
        self.num_tokens = num_patches

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, Dv) -> (B, N, Dlm)
        return self.proj(x)


class MLPBridge(nn.Module):
    """LLaVA-1.5's `mlp2x_gelu`; names follow `LlavaMultiModalProjector` (linear_1, act, linear_2)."""

    def __init__(self, d_vision: int, d_lm: int, num_patches: int, cfg: BridgeConfig):
        super().__init__()
        self.linear_1 = nn.Linear(d_vision, d_lm)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(d_lm, d_lm)
        self.num_tokens = num_patches

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, Dv) -> (B, N, Dlm)
        return self.linear_2(self.act(self.linear_1(x)))


class QFormerBlock(nn.Module):
    """Pre-norm block: queries self-attend, cross-attend to image features, then an FFN."""

    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.ln_self = nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, n_heads, batch_first=True)
        self.ln_cross = nn.LayerNorm(d)
        self.cross_attn = nn.MultiheadAttention(d, n_heads, batch_first=True)
        self.ln_ffn = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:  # (B, Q, d), (B, N, d)
        h = self.ln_self(q)
        q = q + self.self_attn(h, h, h, need_weights=False)[0]
        q = q + self.cross_attn(self.ln_cross(q), kv, kv, need_weights=False)[0]
        return q + self.ffn(self.ln_ffn(q))


class QFormerBridge(nn.Module):
    def __init__(self, d_vision: int, d_lm: int, num_patches: int, cfg: BridgeConfig):
        super().__init__()
        d = cfg.hidden_size or d_vision
        self.queries = nn.Parameter(torch.randn(cfg.num_queries, d) * 0.02)
        self.ln_vision = nn.LayerNorm(d_vision)
        self.vision_proj = nn.Linear(d_vision, d) if d != d_vision else nn.Identity()
        self.blocks = nn.ModuleList(QFormerBlock(d, cfg.num_heads) for _ in range(cfg.num_layers))
        self.ln_out = nn.LayerNorm(d)
        self.out_proj = nn.Linear(d, d_lm)
        self.num_tokens = cfg.num_queries

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, Dv) -> (B, Q, Dlm)
        kv = self.vision_proj(self.ln_vision(x))  # (B, N, d)
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, Q, d)
        for block in self.blocks:
            q = block(q, kv)
        return self.out_proj(self.ln_out(q))


def sincos_positions(n: int, d: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positions for a square grid of n cells (1-D when n is not square). (n, d)"""
    side = math.isqrt(n)
    if side * side == n and d % 4 == 0:
        ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        return torch.cat([_sincos_1d(ys.flatten(), d // 2), _sincos_1d(xs.flatten(), d // 2)], dim=1)
    return _sincos_1d(torch.arange(n), d)


def _sincos_1d(pos: torch.Tensor, d: int) -> torch.Tensor:  # (n,) -> (n, d)
    half = d // 2
    freq = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32) / max(half, 1)))
    angle = pos.float()[:, None] * freq[None]
    out = torch.cat([angle.sin(), angle.cos()], dim=1)
    return nn.functional.pad(out, (0, d - out.shape[1]))


class ResamplerBridge(nn.Module):
    def __init__(self, d_vision: int, d_lm: int, num_patches: int, cfg: BridgeConfig):
        super().__init__()
        d = cfg.hidden_size or d_vision
        self.queries = nn.Parameter(torch.randn(cfg.num_queries, d) * 0.02)
        self.kv_proj = nn.Linear(d_vision, d, bias=False)
        self.ln_q = nn.LayerNorm(d)
        self.ln_kv = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, cfg.num_heads, batch_first=True)
        self.ln_out = nn.LayerNorm(d)
        self.out_proj = nn.Linear(d, d_lm)
        # Query positions are their own grid; key positions follow the patch grid.
        self.register_buffer("q_pos", sincos_positions(cfg.num_queries, d), persistent=False)
        self.register_buffer("kv_pos", sincos_positions(num_patches, d), persistent=False)
        self.num_tokens = cfg.num_queries

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, Dv) -> (B, Q, Dlm)
        kv = self.ln_kv(self.kv_proj(x))  # (B, N, d)
        q = self.ln_q(self.queries).unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, Q, d)
        keys = kv + self.kv_pos[: kv.shape[1]].to(kv.dtype)
        out = self.attn(q + self.q_pos.to(q.dtype), keys, kv, need_weights=False)[0]
        return self.out_proj(self.ln_out(out))


BridgeFactory = Callable[[int, int, int, BridgeConfig], nn.Module]

BRIDGES: dict[str, BridgeFactory] = {
    "linear": LinearBridge,
    "mlp2x_gelu": MLPBridge,
    "qformer": QFormerBridge,
    "resampler": ResamplerBridge,
}


def build_bridge(cfg: BridgeConfig, d_vision: int, d_lm: int, num_patches: int) -> nn.Module:
    """Instantiate the registered bridge `cfg.type`; the result has a `num_tokens` attribute."""
    if cfg.type not in BRIDGES:
        raise ValueError(f"unknown bridge {cfg.type!r}; registered bridges: {', '.join(BRIDGES)}")
    return BRIDGES[cfg.type](d_vision, d_lm, num_patches, cfg)
