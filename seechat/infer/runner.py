"""The model runner: prefill a group of new sequences, then decode the running batch step by step.

Prefill always goes through the model's own forward (`SeeChatModel.__call__`: image features
merged, the transformers LM), with a cache built from any reused prefix, so every architecture
works and the numbers are the reference ones. A decode `step` feeds each row L >= 1 new tokens
(L > 1 verifies speculative drafts) and has two paths:

- `LlamaStyleDecoder`, chosen from the explicit `FAST_DECODERS` registry by the LM's `model_type`
  (Qwen2/2.5/3, Llama, Mistral): the step written out over a decode-layout copy of the LM's
  weights — fused QKV and gate/up, transposed for fast one-row matmuls, a precomputed RoPE table,
  keys and values written in place into the `BatchKV` buffers, one SDPA call per layer. On a small
  model most of a transformers decode step is Python and mask bookkeeping; this path removes it.
  "auto" uses it when the weight copy is small (FAST_DECODE_AUTO_BYTES). Tests check that it
  gives the logits of the transformers forward.
- the generic path for every other LM: the transformers forward with a `DynamicCache` built from
  the batch buffers.

For the same LM family a third, `static_decode` (`seechat.infer.static_decode`): a fixed-shape
step over a slotted KV pool (`SlotKV`), captured as CUDA graphs on a GPU, where launching a
7B model's kernels one by one would cost more than reading its weights. "auto" takes it on CUDA
only; on CPU it runs eagerly (tests, `"on"`) and is slower than the fast path there.

The runner knows tensors and token ids, not requests or chat; `seechat.infer.engine` schedules.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from seechat.infer.kv import BatchKV, Layers, SlotKV
from seechat.infer.ops import norm_params, rms_norm, rms_norm_fp32, rope, signed_sin
from seechat.infer.static_decode import StaticDecoder
from seechat.model.modeling import SeeChatModel

STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # cos/sin depend on the position only


@dataclass
class PrefillRow:
    """One sequence to prefill: `ids` (S,) after a reused prefix `past` (per layer (1, H, P, D))."""

    ids: torch.Tensor  # (S,) long, S >= 1
    past: Layers | None = None
    image_features: torch.Tensor | None = None  # (n_slots, D): features for the image tokens in `ids`


def _left_pad(like: torch.Tensor, width: int, x: torch.Tensor | None) -> torch.Tensor:
    """(1, H, n, D) -> (1, H, width, D) with zeros on the left; None -> all zeros shaped like `like`."""
    if x is None:
        return like.new_zeros((1, like.shape[1], width, like.shape[3]))
    return F.pad(x, (0, 0, width - x.shape[2], 0))


def _t(*weights: torch.Tensor) -> torch.Tensor:
    """(out, in) weights -> one (in, sum of outs) contiguous matrix: fused and transposed."""
    return torch.cat([w.detach() for w in weights]).t().contiguous()


def _mm(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) @ wt (in, out) + bias."""
    flat = x.reshape(-1, x.shape[-1])
    y = torch.mm(flat, wt) if bias is None else torch.addmm(bias, flat, wt)
    return y.view(*x.shape[:-1], wt.shape[1])


def linear_weight_bytes(lm: torch.nn.Module) -> int:
    """Bytes of the LM's 2-D weights other than the input embedding: what the fast path copies."""
    embed = lm.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in lm.parameters() if p.dim() == 2 and p is not embed) + (
        embed.numel() * embed.element_size() if lm.get_output_embeddings().weight is embed else 0
    )


def _cat_or_none(*tensors: torch.Tensor | None) -> torch.Tensor | None:
    return None if any(t is None for t in tensors) else torch.cat(tensors)


class LlamaStyleDecoder:
    """A decode step for pre-norm RMSNorm / RoPE / GQA / gated-MLP decoders, over the transformers
    module's weights.

    It keeps its own copy of the linear weights in the layout decoding wants: QKV and gate/up fused,
    every matrix stored transposed, (in, out) contiguous — on CPU a one-row matmul against that
    layout runs about twice as fast as `F.linear` against (out, in). The copy costs one more LM's
    worth of linear weights, which is why the engine uses this path automatically only for models
    whose copy is small (`ModelRunner`), and why changing the model's weights after the engine
    starts needs a new engine. Norms and embeddings are the model's own tensors.
    """

    def __init__(self, lm: torch.nn.Module):
        cfg = lm.config.get_text_config()
        base = lm.get_decoder()
        self.embed = base.embed_tokens
        head = lm.get_output_embeddings()
        self.lm_head = (_t(head.weight), head.bias)
        self.rotary = base.rotary_emb
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        act = base.layers[0].mlp.act_fn
        self.act = F.silu if cfg.hidden_act == "silu" else act
        self._rms = rms_norm_fp32 if self.embed.weight.dtype == torch.float32 else rms_norm
        self.norm = norm_params(base.norm)
        self.layers = []
        for layer in base.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append(
                (
                    norm_params(layer.input_layernorm),
                    _t(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight),
                    _cat_or_none(a.q_proj.bias, a.k_proj.bias, a.v_proj.bias),
                    norm_params(getattr(a, "q_norm", None)),
                    norm_params(getattr(a, "k_norm", None)),
                    _t(a.o_proj.weight),
                    a.o_proj.bias,
                    a.scaling,
                    norm_params(layer.post_attention_layernorm),
                    _t(m.gate_proj.weight, m.up_proj.weight),
                    _cat_or_none(m.gate_proj.bias, m.up_proj.bias),
                    _t(m.down_proj.weight),
                    m.down_proj.bias,
                    m.gate_proj.out_features,
                )
            )
        self._cos = self._sin = None

    @classmethod
    def supports(cls, lm: torch.nn.Module) -> bool:
        cfg = lm.config.get_text_config()
        base = lm.get_decoder()
        rope = getattr(getattr(base, "rotary_emb", None), "rope_type", None)
        layer_types = getattr(cfg, "layer_types", None) or ["full_attention"]
        return (
            not hasattr(lm, "peft_config")
            and rope in STATIC_ROPE_TYPES
            and all(t == "full_attention" for t in layer_types)
            and all(
                hasattr(layer, "mlp")
                and hasattr(layer.mlp, "gate_proj")
                and hasattr(layer.input_layernorm, "variance_epsilon")
                for layer in base.layers
            )
        )

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin (`ops.signed_sin`) (B, 1, L, D) for positions (B, L), from a table computed
        by the model's own rotary module (so every static RoPE scaling type is transformers' code, not
        re-derived)."""
        need = int(positions.max()) + 1
        if self._cos is None or self._cos.shape[0] < need:
            n = max(need, 2 * (0 if self._cos is None else self._cos.shape[0]), 256)
            dummy = self.embed.weight[:1]
            cos, sin = self.rotary(dummy, torch.arange(n, device=dummy.device)[None])
            self._cos, self._sin = cos[0], signed_sin(sin[0])  # (n, D)
        return self._cos[positions][:, None], self._sin[positions][:, None]

    def __call__(self, tokens: torch.Tensor, kv: BatchKV) -> torch.Tensor:
        """tokens (B, L) at the next L positions of each row of `kv` -> logits (B, L, V). Their
        keys/values are written at columns [kv.length, kv.length + L); `kv.advance` keeps them."""
        b, n = tokens.shape
        t = kv.length
        h, g, d = self.n_heads, self.n_kv, self.head_dim
        rms = self._rms
        pos = kv.next_pos[:, None] + torch.arange(n, device=tokens.device)  # (B, L)
        cos, sin = self._rope(pos)
        kv.mask[:, t : t + n] = True
        mask = None  # no holes and one new token: nothing to mask
        if n > 1 or not kv.dense:
            mask = kv.mask[:, None, None, : t + n]  # (B, 1, 1, T+L)
            if n > 1:
                mask = mask & torch.ones(n, t + n, dtype=torch.bool, device=mask.device).tril(t)
        x = self.embed(tokens)  # (B, L, D_model)
        for i, (ln1, wqkv, bqkv, qn, kn, wo, bo, scale, ln2, wgu, bgu, wd, bd, inter) in enumerate(
            self.layers
        ):
            qkv = _mm(rms(x, *ln1), wqkv, bqkv).view(b, n, h + 2 * g, d)
            qk = qkv[:, :, : h + g]
            if qn is not None:
                qk = torch.cat([rms(qk[:, :, :h], *qn), rms(qk[:, :, h:], *kn)], dim=2)
            qk = rope(qk.transpose(1, 2), cos, sin)  # (B, h + g, L, d)
            kv.keys[i][:, :, t : t + n] = qk[:, h:]
            kv.values[i][:, :, t : t + n] = qkv[:, :, h + g :].transpose(1, 2)
            o = F.scaled_dot_product_attention(
                qk[:, :h],
                kv.keys[i][:, :, : t + n],
                kv.values[i][:, :, : t + n],
                attn_mask=mask,
                scale=scale,
                enable_gqa=g != h,
            )  # (B, h, L, d)
            x = x + _mm(o.transpose(1, 2).reshape(b, n, h * d), wo, bo)
            gu = _mm(rms(x, *ln2), wgu, bgu)
            x = x + _mm(self.act(gu[..., :inter]) * gu[..., inter:], wd, bd)
        return _mm(rms(x, *self.norm), *self.lm_head)  # (B, L, V)


# Explicit registry: LM model_type -> fast decode step. Anything else takes the generic path.
FAST_DECODERS = {
    "qwen2": LlamaStyleDecoder,
    "qwen3": LlamaStyleDecoder,
    "llama": LlamaStyleDecoder,
    "mistral": LlamaStyleDecoder,
}


FAST_DECODE_AUTO_BYTES = 2 << 30  # "auto" copies at most this much: small models, where overhead dominates
STATIC_DEFAULT_LEN = 4096  # tokens per slot of the static KV pool when the engine sets no max_model_len


class ModelRunner:
    """Prefill and decode over a `SeeChatModel`; owns no request state.

    `fast_decode`: "on" uses the registry's fast decode step when the LM has one, "off" never,
    "auto" (default) when its weight copy is at most FAST_DECODE_AUTO_BYTES.
    `static_decode`: "auto" (default) uses the static step for a registry LM on CUDA, "on" on any
    device, "off" never; its KV pool has `slots` rows of `capacity` tokens (0: the LM's limit,
    at most STATIC_DEFAULT_LEN), allocated at the first request. It replaces the fast path.
    `compile_decode`: the static step's layers through `torch.compile` (see `StaticDecoder`).
    """

    def __init__(
        self,
        model: SeeChatModel,
        pad_token_id: int,
        fast_decode: str = "auto",
        static_decode: str = "auto",
        slots: int = 32,
        capacity: int = 0,
        compile_decode: bool = False,
    ):
        for name, value in (("fast_decode", fast_decode), ("static_decode", static_decode)):
            if value not in ("auto", "on", "off"):
                raise ValueError(f"{name} must be 'auto', 'on' or 'off', not {value!r}")
        self.model = model
        self.pad_token_id = pad_token_id
        lm = model.language_model
        fast = FAST_DECODERS.get(lm.config.get_text_config().model_type)
        family = fast is not None and fast.supports(lm)
        on_cuda = self.device.type == "cuda"
        self.static: StaticDecoder | None = None
        self.slots = slots
        self.capacity = 0
        self._slot_kv: SlotKV | None = None
        if family and (static_decode == "on" or (static_decode == "auto" and on_cuda)):
            self.capacity = capacity or min(self.max_positions(), STATIC_DEFAULT_LEN)
            self.static = StaticDecoder(lm, self.capacity, graphs=on_cuda, compile=compile_decode)
        wanted = fast_decode == "on" or (
            fast_decode == "auto" and linear_weight_bytes(lm) <= FAST_DECODE_AUTO_BYTES
        )
        self.fast: LlamaStyleDecoder | None = fast(lm) if self.static is None and wanted and family else None

    @property
    def decode_path(self) -> str:
        if self.static is not None:
            return self.static.path
        return "fast" if self.fast is not None else "transformers"

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def kv_pool_bytes(self) -> int:
        """Bytes of the static path's KV slot pool: allocated by `warm_up` or at the first request,
        and kept for the runner's life (0 before that, or without the static path)."""
        return 0 if self._slot_kv is None else self._slot_kv.nbytes()

    def max_positions(self) -> int:
        """The longest sequence the LM attends over correctly (sliding-window layers cap it)."""
        cfg = self.model.language_model.config.get_text_config()
        n = int(getattr(cfg, "max_position_embeddings", 0) or 1 << 20)
        window = getattr(cfg, "sliding_window", None)
        if window and any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or []):
            n = min(n, int(window))  # within the window, sliding attention equals full attention
        return min(n, self.capacity) if self.capacity else n

    def warm_up(self, steps: list[tuple[int, int]]) -> str:
        """Static path, before the first request: allocate the KV slot pool now (so a pool too large
        for the device fails at start, not at a request) and capture the CUDA graphs (or compile
        the step) for steps of up to b rows of n new tokens, each (b, n) in `steps`
        (`StaticDecoder.warm_up`). -> what was done, for the log; "" without the static path."""
        if self.static is None:
            return ""
        t0 = time.perf_counter()
        cuda = self.device.type == "cuda"
        reserved = torch.cuda.memory_reserved(self.device) if cuda else 0
        if self._slot_kv is None:
            s = self.static
            dims = (self.slots, self.capacity, len(s.weights), s.n_kv, s.head_dim, s.embed.weight.dtype)
            try:
                self._slot_kv = SlotKV(*dims, self.device)
            except torch.OutOfMemoryError as e:
                need = SlotKV.size(*dims)
                raise RuntimeError(
                    f"the static decode KV pool ({self.slots} slots x {self.capacity} tokens = "
                    f"{need / 1e9:.2f} GB) does not fit on {self.device} beside the model: lower "
                    "--max-batch-size or --max-model-len (EngineConfig.max_batch_size / max_model_len)"
                ) from e
        pool = self.kv_pool_bytes
        with torch.inference_mode():
            graphs = self.static.warm_up(self._slot_kv, steps)
        self._slot_kv.clear()
        held = (torch.cuda.memory_reserved(self.device) - reserved - pool) if cuda else 0
        return (
            f"static decode warmed up in {time.perf_counter() - t0:.1f} s: KV pool {pool / 1e9:.2f} GB "
            f"({self.slots} slots x {self.capacity} tokens)"
            + (
                f", {graphs} CUDA graphs (+{max(0, held) / 1e9:.2f} GB reserved)"
                if self.static.graphs
                else ""
            )
            + (", step compiled" if self.static.compiled else "")
        )

    def adopt(self, kv: BatchKV) -> BatchKV | SlotKV:
        """The running batch's KV for a freshly prefilled `kv`: itself, or (static path) the slot
        pool holding its rows."""
        if self.static is None:
            return kv
        if self._slot_kv is None:
            self._slot_kv = SlotKV.like(self.slots, self.capacity, kv)
        self._slot_kv.clear()
        self._slot_kv.merge(kv)
        return self._slot_kv

    @torch.inference_mode()
    def prefill(self, rows: Sequence[PrefillRow]) -> tuple[torch.Tensor, BatchKV]:
        """Run the new part of each row; -> last-position logits (B, V) and the rows' KV."""
        device = self.device
        b = len(rows)
        p_len = [0 if r.past is None else r.past[0][0].shape[2] for r in rows]
        s_len = [int(r.ids.shape[0]) for r in rows]
        pmax, smax = max(p_len), max(s_len)
        ids = torch.full((b, smax), self.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((b, pmax + smax), dtype=torch.long, device=device)
        pos = torch.zeros((b, smax), dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            ids[i, smax - s_len[i] :] = r.ids.to(device)
            mask[i, pmax - p_len[i] : pmax] = 1
            mask[i, pmax + smax - s_len[i] :] = 1
            pos[i, smax - s_len[i] :] = torch.arange(p_len[i], p_len[i] + s_len[i], device=device)
        cache = None
        if pmax:  # reused prefixes, left-padded to a common length; a row without one is all padding
            ref = next(r.past for r in rows if r.past is not None)
            layers = []
            for li, (k0, v0) in enumerate(ref):
                ks = [_left_pad(k0, pmax, r.past[li][0] if r.past is not None else None) for r in rows]
                vs = [_left_pad(v0, pmax, r.past[li][1] if r.past is not None else None) for r in rows]
                layers.append((torch.cat(ks).to(device), torch.cat(vs).to(device)))
            cache = DynamicCache(layers)
        feats = [r.image_features for r in rows if r.image_features is not None and r.image_features.numel()]
        image_features = torch.cat(feats)[None].to(device) if feats else None  # (1, n_slots, D)
        out = self.model(
            ids,
            mask,
            image_features=image_features,
            position_ids=pos,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        layers = [(layer.keys, layer.values) for layer in out.cache.layers]
        next_pos = torch.tensor([p + s for p, s in zip(p_len, s_len, strict=True)], device=device)
        return out.logits[:, -1].float(), BatchKV(layers, mask.bool(), next_pos)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, kv: BatchKV | SlotKV) -> torch.Tensor:
        """tokens (B,) -> logits (B, V) for the next position; appends one column to `kv`."""
        logits = self.step(tokens[:, None], kv)[:, 0]
        kv.advance(1, 1)
        return logits

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, kv: BatchKV | SlotKV) -> torch.Tensor:
        """tokens (B, L) at each row's next L positions -> logits (B, L, V). Their keys/values are
        written at columns [kv.length, kv.length + L); the caller keeps some with `kv.advance`."""
        n = tokens.shape[1]
        kv.reserve(n)
        tokens = tokens.to(self.device)
        if isinstance(kv, SlotKV):
            logits = self.static(tokens, kv)
        elif self.fast is not None:
            logits = self.fast(tokens, kv)
        else:
            logits = self._step_transformers(tokens, kv)
        return logits.float()

    def _step_transformers(self, tokens: torch.Tensor, kv: BatchKV) -> torch.Tensor:
        t, n = kv.length, tokens.shape[1]
        cache = DynamicCache([(k[:, :, :t], v[:, :, :t]) for k, v in zip(kv.keys, kv.values, strict=True)])
        kv.mask[:, t : t + n] = True
        mask = kv.mask[:, : t + n].long()
        pos = kv.next_pos[:, None] + torch.arange(n, device=tokens.device)
        out = self.model.language_model(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=pos,
            cache=cache,
            use_cache=True,
            logits_to_keep=n,
        )
        for i, layer in enumerate(out.cache.layers):
            kv.keys[i][:, :, t : t + n] = layer.keys[:, :, t : t + n]
            kv.values[i][:, :, t : t + n] = layer.values[:, :, t : t + n]
        return out.logits
