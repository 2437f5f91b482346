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

`linear` and `mlp2x_gelu` take `merge: m` (default 1): each m x m block of neighbouring patches is
concatenated into one token before the projection (Qwen2-VL's patch merger, InternVL's pixel
shuffle), so an image costs m^2 fewer LM tokens and no patch feature is dropped. The query bridges
choose their token count with `num_queries` instead.

The bridge does not know tokens, text or the vision model; it sees tensors only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from seechat.config import BridgeConfig


def merged_grid(num_patches: int, merge: int) -> int:
    """Tokens left after merging `merge` x `merge` blocks of a square patch grid; a clear error when
    the grid is not square or its side is not a multiple of `merge`."""
    side = math.isqrt(num_patches)
    if merge < 1 or side * side != num_patches or side % merge:
        raise ValueError(
            f"bridge.merge={merge} needs a square patch grid whose side is a multiple of it; "
            f"the vision tower gives {num_patches} patches"
        )
    return (side // merge) ** 2


def merge_patches(x: torch.Tensor, merge: int) -> torch.Tensor:
    """(B, N, D) on a row-major square grid -> (B, N / merge^2, merge^2 * D): each merge x merge block
    of neighbours concatenated, blocks in row-major order."""
    if merge == 1:
        return x
    b, n, d = x.shape
    g = math.isqrt(n) // merge
    x = x.view(b, g, merge, g, merge, d).permute(0, 1, 3, 2, 4, 5)  # (B, gy, gx, my, mx, D)
    return x.reshape(b, g * g, merge * merge * d)


class LinearBridge(nn.Module):
    def __init__(self, d_vision: int, d_lm: int, num_patches: int, cfg: BridgeConfig):
        super().__init__()
        self.num_tokens = merged_grid(num_patches, cfg.merge)
        self.merge = cfg.merge
        self.proj = nn.Linear(d_vision * cfg.merge**2, d_lm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, Dv) -> (B, N / merge^2, Dlm)
        return self.proj(merge_patches(x, self.merge))


class MLPBridge(nn.Module):
    """LLaVA-1.5's `mlp2x_gelu`; names follow `LlavaMultiModalProjector` (linear_1, act, linear_2)."""

    def __init__(self, d_vision: int, d_lm: int, num_patches: int, cfg: BridgeConfig):
        super().__init__()
        self.num_tokens = merged_grid(num_patches, cfg.merge)
        self.merge = cfg.merge
        self.linear_1 = nn.Linear(d_vision * cfg.merge**2, d_lm)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(d_lm, d_lm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, Dv) -> (B, N / merge^2, Dlm)
        return self.linear_2(self.act(self.linear_1(merge_patches(x, self.merge))))


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
    if cfg.merge != 1 and cfg.type not in ("linear", "mlp2x_gelu"):
        raise ValueError(
            f"bridge.merge applies to the linear and mlp2x_gelu bridges; {cfg.type} sets its token "
            "count with bridge.num_queries"
        )
    return BRIDGES[cfg.type](d_vision, d_lm, num_patches, cfg)
