"""The static decode step: fixed shapes over a `SlotKV`, captured as CUDA graphs on a GPU.

A decode step of a 7B model on a GPU should take about the time it takes to read the weights
once (bandwidth-bound); run eagerly, its ~20 kernel launches per layer cost more than that. This
step has only shapes that depend on the batch bucket, the number of new tokens and the column
bucket — the KV pool (`SlotKV`) never moves, positions and the write columns come from a device
tensor — so on CUDA one graph per (batch bucket, new tokens, column bucket) is captured, all of
them before the first request when the engine starts (`warm_up`), and replayed after. A batch
of b rows runs the graph of the next power of two; the extra slots are free and step harmlessly.
Attention reads the slots' first W columns, W the longest row's length after the step rounded up
to a power of two (at least `min_columns`, at most the slot), and masks those past each row's
end: a 700-token conversation in a 4096-token slot reads 1024 columns of keys and values, not
4096 (at 32 rows of Qwen2.5-7B, 1.9 GB a step instead of 7.5 GB, beside 14 GB of weights).
Power-of-two buckets read under twice the columns in use and keep the graphs few:
log2(slot / min_columns) + 1 per batch bucket.

On CPU (tests, or `static_decode="on"`) the same step runs eagerly: the tests check its greedy
tokens against the transformers forward there. It uses the LM's own weights (`F.linear`), so
it costs no memory beyond the KV pool, unlike `LlamaStyleDecoder`'s transposed copy (which helps
only CPU matmuls); Q/K/V and gate/up each run as one product over a fused matrix that the
modules' parameters are rebound into (`fuse_projections`: the same values, no second copy).
It supports what `LlamaStyleDecoder.supports` accepts: pre-norm RMSNorm,
static RoPE, GQA, gated MLP (Qwen2/2.5/3, Llama, Mistral).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from seechat.infer.kv import SlotKV
from seechat.infer.ops import norm_params, rms_norm, rope, signed_sin

log = logging.getLogger(__name__)


def _fused_rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm` in two kernels: torch's fused normalisation (float32 statistics, rounded once to
    x's dtype, as transformers' `.to(input_dtype)`), then times the weight (transformers' second
    rounding; the weight inside `F.rms_norm` would round once and differ in the last bit)."""
    return F.rms_norm(x, (x.shape[-1],), None, eps) * weight


def attention_inputs(
    x: torch.Tensor,
    w: LayerWeights,
    rms: Callable,
    cos: torch.Tensor,
    sin_signed: torch.Tensor,
    h: int,
    g: int,
    d: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's input norm, Q/K/V projections, Q/K norms and rotary embedding: x (b, L, D_model)
    -> q (b, h, L, d), k (b, g, L, d), v (b, L, g, d). Pure (no writes): `torch.compile` fuses its
    element-wise work. Eagerly, queries and keys rotate together (one set of kernels for both)."""
    b, n = x.shape[:2]
    y = rms(x, *w.input_norm)
    qkv = F.linear(y, *w.qkv).view(b, n, h + 2 * g, d)  # one product for the three
    qk, v = qkv[:, :, : h + g], qkv[:, :, h + g :]
    if w.q_norm is not None:
        qk = torch.cat([rms(qk[:, :, :h], *w.q_norm), rms(qk[:, :, h:], *w.k_norm)], dim=2)
    qk = rope(qk.transpose(1, 2), cos, sin_signed)  # (b, h + g, L, d)
    return qk[:, :h], qk[:, h:], v


def attention_output_and_mlp(
    x: torch.Tensor, o: torch.Tensor, w: LayerWeights, rms: Callable, act: Callable
) -> torch.Tensor:
    """The rest of a layer after attention: output projection, residual, post-attention norm,
    gated MLP, residual. x (b, L, D_model), o (b, L, h * d) -> (b, L, D_model). Pure."""
    x = x + F.linear(o, *w.o)
    y = rms(x, *w.post_norm)
    gate, up = F.linear(y, *w.gate_up).chunk(2, dim=-1)  # one product for the two
    return x + F.linear(act(gate) * up, *w.down)


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's parameters as tensors: (weight, bias or None) per projection, (weight,
    eps) per norm. The step functions take these, not modules, so one compiled function serves
    every layer. Q/K/V and gate/up are each one fused matrix (`fuse_projections`)."""

    input_norm: tuple
    qkv: tuple
    q_norm: tuple | None
    k_norm: tuple | None
    o: tuple
    post_norm: tuple
    gate_up: tuple
    down: tuple

    @classmethod
    def of(cls, layer: torch.nn.Module) -> LayerWeights:
        a, m = layer.self_attn, layer.mlp
        return cls(
            norm_params(layer.input_layernorm),
            fuse_projections([a.q_proj, a.k_proj, a.v_proj]),
            norm_params(getattr(a, "q_norm", None)),
            norm_params(getattr(a, "k_norm", None)),
            (a.o_proj.weight, a.o_proj.bias),
            norm_params(layer.post_attention_layernorm),
            fuse_projections([m.gate_proj, m.up_proj]),
            (m.down_proj.weight, m.down_proj.bias),
        )


def fuse_projections(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Linears that read the same input -> (weight, bias) of one linear that computes them all,
    outputs concatenated in order. At batch 1 a decode step is matrix-vector products, and a small
    one (a 512-row K or V projection) does not reach the memory bandwidth: one product instead of
    three (two for gate/up) is fewer, larger reads. No second copy of the weights: the fused
    matrix is built once and each module's parameter is rebound to its rows of it (same values,
    so the model computes, saves and loads as before)."""
    has_bias = [lin.bias is not None for lin in linears]
    if any(has_bias) and not all(has_bias):
        raise ValueError("cannot fuse projections where only some have a bias")
    weight = _adjacent_rows([lin.weight for lin in linears])
    bias = _adjacent_rows([lin.bias for lin in linears]) if all(has_bias) else None
    if weight is not None and (bias is not None or not all(has_bias)):
        return weight, bias  # fused before (another engine on this model): the same storage again
    # ordinary tensors even when an engine is built under inference_mode: the parameters stay
    # usable for anything else the model does (a later backward, for one)
    with torch.inference_mode(False), torch.no_grad():
        fused = [torch.cat([lin.weight for lin in linears])]
        if all(has_bias):
            fused.append(torch.cat([lin.bias for lin in linears]))
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight.data = fused[0][start : start + rows]
        if lin.bias is not None:
            lin.bias.data = fused[1][start : start + rows]
        start += rows
    return fused[0], fused[1] if len(fused) > 1 else None


def _adjacent_rows(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The one tensor whose consecutive row blocks `tensors` are (contiguous, one storage, in order,
    end to end), as `fuse_projections` leaves them; None when they are not."""
    first = tensors[0]
    offset = first.storage_offset()
    for t in tensors:
        same = t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        if not (
            same and t.is_contiguous() and t.shape[1:] == first.shape[1:] and t.storage_offset() == offset
        ):
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in tensors)
    return first.detach().as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


class StaticDecoder:
    """tokens (B, L) at each slot's next L positions -> logits (B, L, V), keys/values written into
    the slots at columns next_pos .. next_pos + L - 1 (`SlotKV.advance` keeps some).

    `compile`: run each layer's two pure pieces (`attention_inputs`, `attention_output_and_mlp`)
    through `torch.compile` (inductor: Triton kernels on CUDA, C++ on CPU), which fuses the norms,
    rotary embedding, activation and residual adds of a layer into a few kernels; the KV writes and
    attention stay eager between them. Compiled once for all layers; if compiling fails the step
    warns and runs eagerly."""

    min_columns = 256  # the smallest column bucket (see the module docstring)

    def __init__(self, lm: torch.nn.Module, capacity: int, graphs: bool, compile: bool = False):
        cfg = lm.config.get_text_config()
        base = lm.get_decoder()
        self.embed = base.embed_tokens
        self.lm_head = lm.get_output_embeddings()
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.act = base.layers[0].mlp.act_fn
        self.norm = norm_params(base.norm)
        self.weights = [LayerWeights.of(layer) for layer in base.layers]
        self.scaling = [layer.self_attn.scaling for layer in base.layers]
        device = self.embed.weight.device
        cos, sin = base.rotary_emb(self.embed.weight[:1], torch.arange(capacity, device=device)[None])
        # (capacity, D): positions never exceed a slot's columns
        self.cos, self.sin_signed = cos[0], signed_sin(sin[0])
        self.graphs = graphs and device.type == "cuda"
        # On CUDA, torch's fused RMSNorm then the weight (two kernels instead of eight tiny ones, the
        # same numbers as transformers'); on CPU the transformers formula itself, which tests compare.
        self.rms = _fused_rms if device.type == "cuda" else rms_norm
        self.compiled = compile
        self._inputs, self._rest = attention_inputs, attention_output_and_mlp
        if compile:
            self._inputs = torch.compile(attention_inputs, fullgraph=True)
            self._rest = torch.compile(attention_output_and_mlp, fullgraph=True)
        self._graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._tokens: torch.Tensor | None = None  # the graphs' input buffer (slots, L_max)

    @property
    def path(self) -> str:
        return "static" + ("+compiled" if self.compiled else "") + ("+cuda-graphs" if self.graphs else "")

    def columns(self, kv: SlotKV, n: int) -> int:
        """The column bucket of a step of `n` tokens: the longest row's length after it, rounded up
        to a power of two, at least `min_columns`, at most the slot (from the host copy of the
        lengths: no device read)."""
        need = kv.length + n
        return min(kv.capacity, max(self.min_columns, 1 << (need - 1).bit_length()))

    def column_buckets(self, capacity: int) -> list[int]:
        """Every width `columns` can give in a slot of `capacity` tokens."""
        widths, w = [], self.min_columns
        while w < capacity:
            widths.append(w)
            w *= 2
        return [*widths, capacity]

    @staticmethod
    def batch_bucket(b: int, slots: int) -> int:
        """The graph a batch of `b` rows runs: the next power of two, at most the pool's slots."""
        return min(1 << (b - 1).bit_length(), slots)

    def graph_keys(self, kv: SlotKV, steps: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
        """The (batch bucket, new tokens, column bucket) of every graph that steps of up to `b` rows
        and `n` new tokens, for each (b, n) in `steps`, can run, at any row length."""
        keys = {
            (self.batch_bucket(b, kv.slots), n, w)
            for most, n in steps
            for b in range(1, most + 1)
            for w in self.column_buckets(kv.capacity)
        }
        return sorted(keys)

    def warm_up(self, kv: SlotKV, steps: list[tuple[int, int]]) -> int:
        """Before any request: capture every graph that `steps` (see `graph_keys`) can need (on
        CUDA), or compile the step for their shapes (compiled, on a CPU), so that no request pays
        for a capture or a compile, and the engine's step timings, which decide speculation, are
        the steps' own. `kv` must be empty: the captures write keys and values into its columns.
        A capture that fails leaves the step eager, as a failed capture at a request does.
        -> graphs captured."""
        if kv.batch_size:
            raise RuntimeError("warm_up needs an empty KV pool: it writes into the slots' columns")
        keys = self.graph_keys(kv, steps)
        device = kv.next_pos.device
        if not self.graphs:
            if self.compiled:  # one step per (batch bucket, n): the shapes the compiler sees (not the width)
                for b, n in sorted({(b, n) for b, n, _ in keys}):
                    tokens = torch.zeros((b, n), dtype=torch.long, device=device)
                    self._forward_or_eager(tokens, kv, b, keys[0][2])
            return 0
        self._buffer(kv, max(n for _, n, _ in keys), device)
        for key in keys:
            if key not in self._graphs and not self._try_capture(kv, key):
                break
        return len(self._graphs)

    def _try_capture(self, kv: SlotKV, key: tuple[int, int, int]) -> bool:
        """Capture the graph of `key`; if a kernel cannot be captured, warn and leave the step eager
        from now on (correct, slower). -> whether it was captured."""
        try:
            self._graphs[key] = self._capture(kv, *key)
            return True
        except RuntimeError as e:
            log.warning("CUDA graph capture failed (%s); the static decode step runs eagerly", e)
            self.graphs = False
            torch.cuda.synchronize()
            return False

    def _buffer(self, kv: SlotKV, n: int, device: torch.device) -> None:
        """The graphs' input buffer, at least `n` tokens wide (a wider one drops every graph)."""
        if self._tokens is None or self._tokens.shape[1] < n:
            self._tokens = torch.zeros((kv.slots, max(n, 8)), dtype=torch.long, device=device)
            self._graphs.clear()  # captured on the old buffer

    def __call__(self, tokens: torch.Tensor, kv: SlotKV) -> torch.Tensor:
        b, n = tokens.shape
        width = self.columns(kv, n)
        if not self.graphs:
            return self._forward_or_eager(tokens, kv, b, width)
        bucket = self.batch_bucket(b, kv.slots)
        self._buffer(kv, n, tokens.device)
        self._tokens[:b, :n] = tokens
        key = (bucket, n, width)
        if key not in self._graphs and not self._try_capture(kv, key):
            return self._forward_or_eager(tokens, kv, b, width)
        graph, out = self._graphs[key]
        graph.replay()
        return out[:b]

    def _forward_or_eager(self, tokens: torch.Tensor, kv: SlotKV, b: int, width: int) -> torch.Tensor:
        """`forward`; if compiling it fails (no compiler, an unsupported op), warn once and go on
        eagerly. Compiling writes nothing before it fails, so the step can simply run again."""
        if not self.compiled:
            return self.forward(tokens, kv, b, width)
        try:
            return self.forward(tokens, kv, b, width)
        except Exception as e:  # torch._dynamo / inductor errors have no common public base class
            log.warning(
                "torch.compile of the static decode step failed (%s: %s); it runs eagerly",
                type(e).__name__,
                e,
            )
            self.compiled = False
            self._inputs, self._rest = attention_inputs, attention_output_and_mlp
            return self.forward(tokens, kv, b, width)

    def _capture(self, kv: SlotKV, bucket: int, n: int, width: int):
        """Warm up on a side stream (as torch.cuda.graphs requires; a compiled step compiles
        here), then capture. Both write only columns at and past each slot's end, which the real
        step overwrites."""
        tokens = self._tokens[:bucket, :n]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward_or_eager(tokens, kv, bucket, width)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # a private memory pool per graph (they replay in any order); other threads (another engine,
        # the caller preprocessing images) may use CUDA meanwhile
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = self.forward(tokens, kv, bucket, width)
        return graph, out

    def forward(self, tokens: torch.Tensor, kv: SlotKV, b: int, width: int) -> torch.Tensor:
        """The step over slots [0, b), attending over their first `width` columns (every row's
        new tokens land before it), in plain tensor ops with fixed shapes (capturable)."""
        n = tokens.shape[1]
        h, g, d = self.n_heads, self.n_kv, self.head_dim
        r = h // g
        pos = kv.next_pos[:b, None] + torch.arange(n, device=tokens.device)  # (b, L)
        cos, sin_signed = self.cos[pos][:, None], self.sin_signed[pos][:, None]  # (b, 1, L, D)
        cols = torch.arange(width, device=tokens.device)
        mask = cols <= pos[:, :, None]  # (b, L, W): each token sees its row up to itself
        # queries grouped by their KV head: (b, g, r * L, D) against (b, g, W, D), no K/V repeat
        mask = mask[:, None, None].expand(b, 1, r, n, width).reshape(b, 1, r * n, width)
        rows = torch.arange(b, device=tokens.device)[:, None]  # (b, 1)
        x = self.embed(tokens)  # (b, L, D_model)
        for i, w in enumerate(self.weights):
            q, k, v = self._inputs(x, w, self.rms, cos, sin_signed, h, g, d)
            kb, vb = kv.keys[i], kv.values[i]
            kb[rows, :, pos] = k.transpose(1, 2)  # (b, L, g, D) into slot rows, columns pos
            vb[rows, :, pos] = v
            o = F.scaled_dot_product_attention(
                q.reshape(b, g, r * n, d),
                kb[:b, :, :width],
                vb[:b, :, :width],
                attn_mask=mask,
                scale=self.scaling[i],
            )  # (b, g, r * L, D)
            o = o.reshape(b, h, n, d).transpose(1, 2).reshape(b, n, h * d)  # SDPA on CUDA: not contiguous
            x = self._rest(x, o, w, self.rms, self.act)
        return self.lm_head(self.rms(x, *self.norm))  # (b, L, V)
