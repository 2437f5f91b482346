"""Per-GPU memory and wall time of a recipe on N GPUs, before renting them (`seechat estimate`).

Arithmetic, not a profiler: parameter counts come from the experts' transformers configs
(`seechat.model.sizes`: a local directory's config.json, or a registry of known hub ids for offline
use), token counts from the recipe, and every constant it leans on is printed with the result.
What it models is what
seechat's loop does: the model in `model.dtype`, torch AdamW (moments in the parameter dtype, no
fp32 master copy) under DDP and FSDP, DeepSpeed's bf16 optimizer (fp32 master + moments) under
ZeRO. The activation formula for Qwen2/Llama-style decoders was calibrated against the tensors
autograd actually saves (tests/test_estimate.py checks it). Not modelled: the CUDA context,
communication buffers other than those named, allocator fragmentation — keep ~10 % free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from seechat.config import RunConfig
from seechat.model.fused_loss import FUSED_HEAD_LMS, chunk_tokens
from seechat.model.sizes import (
    EXPERT_LINEARS,
    LMShape,
    VisionShape,
    checkpointed_layers,
    expert_config,
    lm_shape,
    lora_params,
    vision_shape,
    visual_expert_params,
)

GIB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float  # total memory as CUDA reports it
    bf16_tflops: float  # dense (no sparsity) peak


GPUS = {
    "a100": GPU("A100 SXM 80GB", 79.2, 312.0),
    "h100": GPU("H100 SXM 80GB", 79.1, 989.0),
    "h200": GPU("H200 SXM 141GB", 139.8, 989.0),
}
STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")
DEFAULT_SAMPLES = {"pairs": 23_000_000, "conversations": 157_712}  # SEEChat's pairs; LLaVA-Instruct-150K
DEFAULT_TEXT_TOKENS = {"pairs": 64, "conversations": 512}
DS_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements)
DS_MAX_LIVE_PARAMETERS = 1_000_000_000  # DeepSpeed's default stage3_max_live_parameters (elements)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class BridgeProfile:
    params: int
    num_tokens: int  # LM tokens per image
    saved_bytes_per_image: int  # activations autograd keeps for the backward pass
    train_flops_per_image: int  # forward + backward


def bridge_profile(cfg: RunConfig, vision: VisionShape, lm: LMShape) -> BridgeProfile:
    """Build the recipe's bridge on the meta device (no memory) and measure it."""
    from torch.utils.flop_counter import FlopCounterMode

    from seechat.model.bridges import build_bridge

    features = vision.patches + (vision.has_cls and cfg.model.vision.select == "cls_patch")
    dtype = getattr(torch, cfg.model.dtype)
    with torch.device("meta"):
        bridge = build_bridge(cfg.model.bridge, vision.hidden, lm.hidden, features).to(dtype).train()

    def saved(batch: int) -> int:
        sizes: list[int] = []
        x = torch.empty(batch, features, vision.hidden, device="meta", dtype=dtype)
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: sizes.append(t.numel() * t.element_size()) or t, lambda t: t
        ):
            bridge(x)
        return sum(sizes)

    with FlopCounterMode(display=False) as flops:
        bridge(torch.empty(1, features, vision.hidden, device="meta", dtype=dtype)).sum().backward()
    return BridgeProfile(
        sum(p.numel() for p in bridge.parameters()),
        bridge.num_tokens,
        saved(2) - saved(1),
        flops.get_total_flops(),
    )  # the difference drops the weights


def activation_bytes(cfg: RunConfig) -> int:
    """Bytes per activation element: 2 when the model or autocast computes in 16 bits."""
    return 2 if cfg.model.dtype != "float32" or cfg.train.mixed_precision != "no" else 4


# ---------------------------------------------------------------- memory


@dataclass(frozen=True)
class Line:
    name: str
    bytes: float
    note: str


@dataclass(frozen=True)
class ParamMemory:
    """Inputs of the parameter-state arithmetic, in bytes unless said otherwise."""

    weights: float  # every parameter at its dtype
    trainable: float  # trainable parameters at their dtype
    n_trainable: int
    layer: float  # one decoder layer (an FSDP unit)
    root: float  # everything outside the decoder layers (FSDP's root unit)
    largest_module: float  # the largest module ZeRO-3 gathers at once


def parameter_memory(m: ParamMemory, strategy: str, gpus: int) -> list[Line]:
    """Weights, gradients and optimizer states on one GPU."""
    n = gpus
    if strategy == "ddp":
        return [
            Line("weights", m.weights, "every parameter, replicated"),
            Line(
                "gradients",
                2 * m.trainable,
                "trainable, plus DDP's bucket copy of the same size "
                "(gradient_as_bucket_view=False, accelerate's default)",
            ),
            Line("optimizer", 2 * m.trainable, "AdamW exp_avg + exp_avg_sq in the parameter dtype"),
        ]
    if strategy == "fsdp":
        return [
            Line(
                "weights",
                m.weights / n + m.root + 2 * m.layer,
                f"1/{n} shard + the root unit (all but decoder layers) gathered for the whole step "
                "+ 2 decoder layers gathered (running + prefetched)",
            ),
            Line("gradients", m.trainable / n, f"trainable, 1/{n} shard"),
            Line("optimizer", 2 * m.trainable / n, f"AdamW moments in the parameter dtype, 1/{n} shard"),
        ]
    bucket = min(DS_REDUCE_BUCKET, m.n_trainable) * 2
    optimizer = Line(
        "optimizer",
        12 * m.n_trainable / n,
        f"DeepSpeed bf16: fp32 master weights + Adam moments (12 B/param), 1/{n} shard",
    )
    gradients = Line(
        "gradients",
        m.trainable / n + bucket,
        f"trainable, 1/{n} shard + reduce bucket (min({DS_REDUCE_BUCKET:.0e}, trainable) elements, bf16)",
    )
    if strategy == "zero2":
        return [Line("weights", m.weights, "every parameter, replicated"), gradients, optimizer]
    if strategy == "zero3":
        live = min(2 * m.largest_module, DS_MAX_LIVE_PARAMETERS * 2)
        return [
            Line(
                "weights",
                m.weights / n + live,
                f"1/{n} shard + gathered modules (2 x the largest, "
                f"capped by stage3_max_live_parameters={DS_MAX_LIVE_PARAMETERS:.0e})",
            ),
            gradients,
            optimizer,
        ]
    raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")


def lm_layer_activation_bytes(lm: LMShape, act_bytes: int, linear_inputs_saved: bool) -> float:
    """Bytes one decoder layer keeps for backward, per token (SDPA/flash attention, no dropout).

    RMSNorm (transformers' code) keeps its input upcast to fp32, and when weights learn the cast
    and scaled outputs; attention keeps q, k, v, its output and an fp32 log-sum-exp per head;
    the SwiGLU MLP keeps gate, up and silu(gate), and the down-projection input when it learns.
    Inputs of linear layers are saved only when their weights (or LoRA adapters) train."""
    h, a = lm.hidden, act_bytes
    norms = lm.norms_per_layer * (4 * h + (2 * a * h if linear_inputs_saved else 0) + 4)
    attention = a * (2 * lm.q_dim + 2 * lm.kv_dim) + 4 * lm.heads
    mlp = a * lm.intermediate * (4 if linear_inputs_saved else 3)
    return norms + attention + mlp


def logits_peak_bytes(lm: LMShape, act_bytes: int) -> float:
    """Per position the LM head runs at, at the loss backward: the logits (act dtype), their fp32
    log-softmax, and the fp32 gradient flowing in and out of it (seechat's loss upcasts logits to
    fp32). Training runs the head only at positions that predict a supervised token
    (`return_logits=False`), never at image tokens: at most the text positions."""
    return lm.vocab * (act_bytes + 12)


def fuses_head(cfg: RunConfig, lm: LMShape) -> bool:
    """Whether training fuses this LM's head with the loss (`train.fused_loss`; not a LoRA'd head)."""
    lora_head = cfg.trainable.lm == "lora" and "lm_head" in cfg.trainable.lora.target_modules
    return cfg.train.fused_loss and lm.family in FUSED_HEAD_LMS and not lora_head


@dataclass(frozen=True)
class Activations:
    without_checkpointing: float
    with_checkpointing: float
    tokens: int  # per micro-batch


def activation_memory(
    cfg: RunConfig, lm: LMShape, vision: VisionShape, bridge: BridgeProfile, seq_len: int
) -> Activations:
    batch = cfg.train.batch_size
    tokens = batch * seq_len
    a = activation_bytes(cfg)
    learns = cfg.trainable.lm != "frozen"
    lora_dropout = cfg.trainable.lm == "lora" and cfg.trainable.lora.dropout > 0
    # LoRA with dropout keeps each adapter's dropped input copy (+ a 1-byte mask) instead of the input
    layer = lm_layer_activation_bytes(lm, a, learns and not lora_dropout)
    if lora_dropout:
        layer += (a + 1) * sum(i for i, _ in lm.linears().values())
    final_norm = 4 * lm.hidden + (2 * a * lm.hidden if learns else 0)
    # the LM head runs at text positions only (at most; only supervised ones in fact)
    head_tokens = tokens * max(0, seq_len - bridge.num_tokens) / seq_len
    if fuses_head(cfg, lm):
        # one chunk's logits at a time, in the product dtype and in float32, and the head's gradient,
        # made in the loss forward and held until its backward (seechat.model.fused_loss)
        head = min(head_tokens, chunk_tokens(lm.vocab)) * lm.vocab * (a + 4)
        head += lm.vocab * lm.hidden * a if cfg.trainable.lm == "full" else 0
        held = 0.0  # nothing of the loss outlives its backward
    else:
        head = head_tokens * logits_peak_bytes(lm, a)
        held = tokens * lm.vocab * a
    images = batch * (bridge.saved_bytes_per_image if cfg.trainable.bridge == "full" else 0)
    if cfg.model.fusion == "deep" and cfg.trainable.experts == "full":
        # at image positions the experts' linears learn, so their inputs are kept as a learning
        # LM's are (the LM itself is frozen: deep fusion refuses anything else)
        extra = lm_layer_activation_bytes(lm, a, True) - lm_layer_activation_bytes(lm, a, False)
        images += batch * bridge.num_tokens * lm.layers * extra
    if cfg.trainable.vision != "frozen":  # ViT layers: norms, q/k/v/out, fc1 + gelu (approximate)
        v = vision
        images += batch * v.layers * v.tokens * a * (4 * v.hidden + 4 * v.hidden + 2 * v.intermediate)
    plain = tokens * (lm.layers * layer + final_norm) + head + images
    # Checkpointed: a recomputed layer keeps its input, the others (train.checkpoint_every > 1) all
    # they save; backward recomputes one layer at a time, after the loss backward (the logits stay
    # referenced by the step's output until the next step).
    recomputed = _recomputed_layers(cfg, lm)
    kept = tokens * (recomputed * a * lm.hidden + (lm.layers - recomputed) * layer + final_norm) + images
    checkpointed = kept + max(head, held + tokens * layer)
    return Activations(plain, checkpointed, tokens)


# ---------------------------------------------------------------- compute


def train_flops_per_sample(
    cfg: RunConfig, lm: LMShape, vision: VisionShape, bridge: BridgeProfile, seq_len: int, checkpointing: bool
) -> dict[str, float]:
    """Forward + backward FLOPs of one sample, by part. A frozen LM still back-propagates to its
    inputs (the image tokens), which costs one forward's worth; learning weights costs another."""
    s = seq_len
    layer_mm = 2 * sum(i * o for i, o in lm.linears().values())  # forward, per token
    attention = 2 * s * lm.q_dim  # causal: QK^T and AV over s/2 keys on average, per token
    head = 2 * lm.hidden * lm.vocab
    backward = 2 if cfg.trainable.lm == "full" else 1
    # the share of layers whose forward runs again in the backward pass
    recompute = _recomputed_layers(cfg, lm) / lm.layers if checkpointing else 0
    per_token = lm.layers * (layer_mm * (1 + backward + recompute) + attention * (3 + recompute))
    per_token += head * (1 + backward)
    v = vision
    vision_fwd = v.layers * (
        2 * (4 * v.hidden**2 + 2 * v.hidden * v.intermediate) * v.tokens + 4 * v.tokens**2 * v.hidden
    )
    vision_fwd += 2 * v.channels * v.patch_size**2 * v.hidden * v.patches
    vision_total = vision_fwd * (1 if cfg.trainable.vision == "frozen" else 3)
    out = {"lm": per_token * s, "vision": vision_total, "bridge": float(bridge.train_flops_per_image)}
    if cfg.model.fusion == "deep":
        # the experts run at image positions on top of the LM's own projections there (whose outputs
        # the hooks replace): forward, input gradient and, when they learn, weight gradient
        expert_mm = 2 * sum(i * o for n, (i, o) in lm.linears().items() if n in EXPERT_LINEARS)
        passes = 3 + recompute if cfg.trainable.experts == "full" else 2 + recompute
        out["experts"] = float(lm.layers * expert_mm * passes * min(bridge.num_tokens, s))
    return out


def _recomputed_layers(cfg: RunConfig, lm: LMShape) -> int:
    """LM layers whose activations gradient checkpointing recomputes (train.checkpoint_every)."""
    return checkpointed_layers(lm.layers, cfg.train.checkpoint_every)


def _checkpointing(cfg: RunConfig, lm: LMShape) -> str:
    if cfg.train.checkpoint_every <= 1:
        return "on"
    every = cfg.train.checkpoint_every
    return f"on for {_recomputed_layers(cfg, lm)} of {lm.layers} layers (every {every})"


# ---------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class Setup:
    gpus: int = 8
    gpu: str = "h100"
    strategy: str = "ddp"
    mfu: float = 0.4
    samples: int | None = None  # None: DEFAULT_SAMPLES for the data kind
    text_tokens: int | None = None  # per sample, mean; None: DEFAULT_TEXT_TOKENS
    epochs: float = 1.0


@dataclass(frozen=True)
class Estimate:
    recipe: str
    setup: Setup
    parts: list[tuple[str, str, int, str, str]]  # (part, path, params, trainable, source)
    memory: list[Line]
    activations: Activations
    seq_len_memory: int
    seq_len_mean: int
    image_tokens: int
    total_bytes: float
    flops_per_sample: dict[str, float]
    samples: int
    global_batch: int
    steps: int
    recipe_steps: int
    wall_seconds: float
    assumptions: list[str]


def estimate(cfg: RunConfig, setup: Setup, recipe: str = "") -> Estimate:
    if setup.gpu not in GPUS:
        raise ValueError(f"unknown GPU {setup.gpu!r}; choose from {', '.join(GPUS)}")
    gpu = GPUS[setup.gpu]
    lm = lm_shape(expert_config(cfg.model.lm.path))
    vision = vision_shape(expert_config(cfg.model.vision.path))
    bridge = bridge_profile(cfg, vision, lm)
    w = DTYPE_BYTES[cfg.model.dtype]
    t = cfg.trainable

    trainable_bytes, n_trainable = 0.0, 0
    lora_total = 0
    for shape, mode in ((vision, t.vision), (lm, t.lm)):
        if mode == "full":
            trainable_bytes, n_trainable = trainable_bytes + shape.params * w, n_trainable + shape.params
        elif mode == "lora":  # peft keeps adapters in fp32 (autocast_adapter_dtype)
            n = lora_params(shape, cfg.trainable.lora)
            lora_total += n
            trainable_bytes, n_trainable = trainable_bytes + 4 * n, n_trainable + n
    if t.bridge == "full":
        trainable_bytes, n_trainable = trainable_bytes + bridge.params * w, n_trainable + bridge.params
    experts = visual_expert_params(lm) if cfg.model.fusion == "deep" else 0
    if experts and t.experts == "full":
        trainable_bytes, n_trainable = trainable_bytes + experts * w, n_trainable + experts
    # the experts are a module beside the LM, not inside its decoder layers: FSDP's root unit
    all_params = vision.params + bridge.params + lm.params + experts
    pm = ParamMemory(
        weights=all_params * w + 4 * lora_total,
        trainable=trainable_bytes,
        n_trainable=n_trainable,
        layer=lm.layer_params * w,
        root=(all_params - lm.layers * lm.layer_params) * w,
        largest_module=max(lm.layer_params, lm.embed_params) * w,
    )
    memory = parameter_memory(pm, setup.strategy, setup.gpus)

    kind = cfg.data.kind
    text_tokens = setup.text_tokens if setup.text_tokens is not None else DEFAULT_TEXT_TOKENS[kind]
    image_tokens = bridge.num_tokens
    seq_mean = min(cfg.model.max_length, image_tokens + text_tokens)
    seq_memory = seq_mean if kind == "pairs" else cfg.model.max_length
    acts = activation_memory(cfg, lm, vision, bridge, seq_memory)
    ckpt = cfg.train.gradient_checkpointing
    act_bytes = acts.with_checkpointing if ckpt else acts.without_checkpointing
    other = acts.without_checkpointing if ckpt else acts.with_checkpointing
    memory.append(
        Line(
            "activations",
            act_bytes,
            f"micro-batch {cfg.train.batch_size} x {seq_memory} tokens, "
            f"gradient checkpointing {_checkpointing(cfg, lm) if ckpt else 'off'} "
            f"({'off' if ckpt else 'on'}: {other / GIB:.1f} GiB)",
        )
    )
    total = sum(line.bytes for line in memory)

    flops = train_flops_per_sample(cfg, lm, vision, bridge, seq_mean, ckpt)
    samples = setup.samples if setup.samples is not None else DEFAULT_SAMPLES[kind]
    global_batch = cfg.train.batch_size * cfg.train.grad_accum * setup.gpus
    steps = math.ceil(samples * setup.epochs / global_batch)
    wall = samples * setup.epochs * sum(flops.values()) / (setup.gpus * gpu.bf16_tflops * 1e12 * setup.mfu)

    m = cfg.model
    parts = [
        ("vision", m.vision.path, vision.params, t.vision, _source(m.vision.path)),
        ("bridge", m.bridge.type, bridge.params, t.bridge, "built on the meta device"),
        ("lm", m.lm.path, lm.params, t.lm, _source(m.lm.path)),
    ]
    if experts:
        parts.append(
            ("experts", "visual experts (q/k/v + MLP per layer)", experts, t.experts, "seechat.model.sizes")
        )
    if lora_total:
        parts.append(
            ("lora", f"r={t.lora.r} {','.join(t.lora.target_modules)}", lora_total, "full", "r x (in + out)")
        )
    a = activation_bytes(cfg)
    assumptions = [
        f"GPU: {gpu.name}, {gpu.memory_gib} GiB, {gpu.bf16_tflops:.0f} TFLOP/s dense bf16 peak; "
        f"MFU {setup.mfu:.0%}",
        f"weights in model.dtype={m.dtype} ({w} B/param); activations {a} B/element",
        f"data: {samples:,} {kind} x {setup.epochs:g} epoch(s)"
        + ("" if setup.samples is not None else " (default for this data kind; --samples to change)"),
        f"tokens per sample: {image_tokens} image tokens (bridge {m.bridge.type}) + {text_tokens} "
        f"text tokens on average (--text-tokens), capped at model.max_length={m.max_length}",
        (
            "memory: a micro-batch of batch_size x model.max_length tokens (worst case: group_by_length "
            "makes the longest batches this long, padded or padding-free)"
        )
        if kind == "conversations"
        else "memory: micro-batches of the mean length",
        "vision tower frozen: runs forward only and keeps no activations (no gradient reaches it)"
        if t.vision == "frozen"
        else "vision tower trains: ViT activations approximated, not calibrated",
        "LM activations: per-layer formula calibrated on transformers' Qwen2 code with SDPA (no S^2 "
        "attention matrix); "
        + (
            f"the LM head fused with the loss (train.fused_loss): one chunk of {chunk_tokens(lm.vocab)} "
            "tokens' logits at a time" + (", plus the head's gradient" if t.lm == "full" else "")
            if fuses_head(cfg, lm)
            else "logits (upcast to fp32 for the loss) only at text positions: training runs the LM "
            "head where a supervised token is predicted, never at image tokens"
        ),
        "FLOPs: 2 per multiply-add; backward = 1x forward for a frozen/LoRA LM (input gradients), 2x when it "
        "learns; checkpointing adds one forward of the decoder layers; padding not counted",
        *(
            [
                "deep fusion: visual experts (a q/k/v + MLP copy per LM layer) in model.dtype, outside "
                "the decoder layers (under FSDP they sit in the root unit, gathered for the whole step); "
                "activations of their learning linears at image positions; their FLOPs on top of the "
                "LM's, whose projections also run at image positions; gradient checkpointing is not "
                "available with deep fusion"
            ]
            if experts
            else []
        ),
        "not counted: CUDA context, NCCL buffers, allocator fragmentation (keep ~10% free); data loading "
        "assumed to keep up; communication assumed hidden behind compute (the same wall time for every "
        "strategy: FSDP/ZeRO-3 all-gathers must fit inside the MFU figure)",
    ]
    return Estimate(
        recipe,
        setup,
        parts,
        memory,
        acts,
        seq_memory,
        seq_mean,
        image_tokens,
        total,
        flops,
        samples,
        global_batch,
        steps,
        cfg.train.max_steps,
        wall,
        assumptions,
    )


def _source(path: str) -> str:
    return (
        "local config.json" if Path(path).is_dir() else "registry preset: seechat.model.sizes.ARCHITECTURES"
    )


def render(e: Estimate) -> str:
    s, gpu = e.setup, GPUS[e.setup.gpu]
    out = [
        f"seechat estimate: {e.recipe or 'recipe'} on {s.gpus} x {gpu.name}, {s.strategy}",
        "",
        "parameters",
    ]
    for part, path, n, mode, source in e.parts:
        out.append(f"  {part:<7} {n / 1e6:>9.1f} M  {mode:<7} {path}  ({source})")
    out += ["", "per-GPU memory"]
    for line in e.memory:
        out.append(f"  {line.name:<12} {line.bytes / GIB:>7.1f} GiB  {line.note}")
    fits = e.total_bytes <= 0.9 * gpu.memory_gib * GIB
    out.append(
        f"  {'total':<12} {e.total_bytes / GIB:>7.1f} GiB  of {gpu.memory_gib} GiB: "
        f"{'fits' if fits else 'does NOT fit'} (with 10% kept free)"
    )
    per_sample = sum(e.flops_per_sample.values())
    split = ", ".join(f"{k} {v / per_sample:.0%}" for k, v in e.flops_per_sample.items())
    out += [
        "",
        "wall time",
        f"  {per_sample / 1e12:.2f} TFLOP per sample ({split}); {e.seq_len_mean} tokens per sample",
        f"  {e.samples * s.epochs:,.0f} samples = {e.steps:,} optimizer steps of {e.global_batch:,} "
        f"(the recipe's train.max_steps: {e.recipe_steps:,})",
        f"  {e.wall_seconds / 3600:.1f} h on {s.gpus} GPUs ({e.wall_seconds * s.gpus / 3600:,.0f} GPU-hours)",
        "",
        "assumptions",
    ]
    out += [f"  - {a}" for a in e.assumptions]
    return "\n".join(out)
