"""How big an expert is, from its transformers config alone: parameter counts by formula.

`LMShape` (Qwen2 / Llama / GLM-4 decoders) and `VisionShape` (CLIP / Chinese-CLIP / SigLIP ViTs)
hold the numbers that size an architecture; their `params` equal `sum(p.numel())` of the real
transformers model (tests/model/test_sizes.py). `expert_config` reads a local directory's
config.json, or, for hub ids that are not on disk, builds the config from `ARCHITECTURES`, a small
registry of known shapes — nothing is downloaded. What this module is not: a loader; it never
builds the weights (`seechat estimate` uses it to size a run before renting GPUs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from seechat.config import LoraConfig


def _qwen2_7b():
    from transformers import Qwen2Config

    return Qwen2Config(
        hidden_size=3584,
        num_hidden_layers=28,
        intermediate_size=18944,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
        rope_theta=1e6,
        max_position_embeddings=32768,
    )


def _chinese_clip_vit_l14(image_size: int) -> Callable:
    def make():
        from transformers import ChineseCLIPVisionConfig

        return ChineseCLIPVisionConfig(
            hidden_size=1024,
            num_hidden_layers=24,
            intermediate_size=4096,
            num_attention_heads=16,
            image_size=image_size,
            patch_size=14,
        )

    return make


# Hub ids whose config is known without a download; a local directory's config.json always wins.
ARCHITECTURES: dict[str, Callable] = {
    "Qwen/Qwen2.5-7B": _qwen2_7b,
    "Qwen/Qwen2.5-7B-Instruct": _qwen2_7b,
    "OFA-Sys/chinese-clip-vit-large-patch14": _chinese_clip_vit_l14(224),
    "OFA-Sys/chinese-clip-vit-large-patch14-336px": _chinese_clip_vit_l14(336),
}


def expert_config(path: str):
    """The transformers config of an expert: a local directory's, else the registry's."""
    if Path(path).is_dir():
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
    elif path in ARCHITECTURES:
        config = ARCHITECTURES[path]()
    else:
        raise ValueError(
            f"{path!r} is neither a local model directory nor a known architecture; "
            f"known: {', '.join(ARCHITECTURES)} (add it to seechat.model.sizes.ARCHITECTURES)"
        )
    return config.vision_config if getattr(config, "vision_config", None) is not None else config


def with_layers(config, layers: int):
    """A copy of a transformers config with `layers` layers and every other field the same: the
    widths, heads, vocabulary and image size of a real expert at a depth a CPU can run (the GPU
    benchmarks' full-width rehearsals). Per-layer lists (`layer_types`) are derived again."""
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    fields = {**config.to_dict(), "num_hidden_layers": layers}
    fields.pop("layer_types", None)
    return type(config)(**fields)


@dataclass(frozen=True)
class LMShape:
    """A decoder-only LM (Qwen2 / Llama / GLM-4 families) as the numbers that size it."""

    family: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    norms_per_layer: int

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer, by module name."""
        h, i = self.hidden, self.intermediate
        mlp = (
            {"gate_up_proj": (h, 2 * i)}
            if self.family == "glm4"
            else {"gate_proj": (h, i), "up_proj": (h, i)}
        )
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            **mlp,
            "down_proj": (i, h),
        }

    @property
    def layer_params(self) -> int:
        h = self.hidden
        weights = sum(a * b for a, b in self.linears().values())
        biases = (self.q_dim + 2 * self.kv_dim) * self.qkv_bias + h * self.o_bias
        biases += (2 * self.intermediate + h) * self.mlp_bias
        return weights + biases + self.norms_per_layer * h

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        head = 0 if self.tied else self.vocab * self.hidden
        return self.embed_params + self.layers * self.layer_params + self.hidden + head


def _lm_shape(config, family: str, qkv_bias: bool, o_bias: bool, mlp_bias: bool, norms: int) -> LMShape:
    c = config
    return LMShape(
        family,
        c.hidden_size,
        c.num_hidden_layers,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        c.vocab_size,
        bool(c.tie_word_embeddings),
        qkv_bias,
        o_bias,
        mlp_bias,
        norms,
    )


LM_FAMILIES: dict[str, Callable[..., LMShape]] = {
    "qwen2": lambda c: _lm_shape(c, "qwen2", True, False, False, 2),
    "llama": lambda c: _lm_shape(c, "llama", c.attention_bias, c.attention_bias, c.mlp_bias, 2),
    "glm4": lambda c: _lm_shape(c, "glm4", c.attention_bias, False, False, 4),
}


@dataclass(frozen=True)
class VisionShape:
    """A ViT vision encoder (CLIP / Chinese-CLIP / SigLIP) as the numbers that size it."""

    family: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    image_size: int
    patch_size: int
    channels: int
    has_cls: bool  # CLIP-style class token (+ pre-layernorm); SigLIP has neither
    pooling_head: bool  # SigLIP's attention-pooling head

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens(self) -> int:
        return self.patches + self.has_cls

    def linears(self) -> dict[str, tuple[int, int]]:
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, h),
            "k_proj": (h, h),
            "v_proj": (h, h),
            "out_proj": (h, h),
            "fc1": (h, i),
            "fc2": (i, h),
        }

    @property
    def layer_params(self) -> int:
        h, i = self.hidden, self.intermediate
        return 4 * (h * h + h) + 2 * 2 * h + (h * i + i) + (i * h + h)

    @property
    def params(self) -> int:
        h, i = self.hidden, self.intermediate
        patch = self.channels * self.patch_size**2 * h + (
            0 if self.has_cls else h
        )  # SigLIP's conv has a bias
        embeddings = patch + self.tokens * h + (h if self.has_cls else 0)  # positions (+ class embedding)
        norms = 2 * h * (2 if self.has_cls else 1)  # (pre-layernorm +) post-layernorm
        head = (h + 4 * h * h + 4 * h + 2 * h + (h * i + i) + (i * h + h)) if self.pooling_head else 0
        return embeddings + self.layers * self.layer_params + norms + head


def _vision_shape(config, family: str, has_cls: bool, head: bool) -> VisionShape:
    c = config
    return VisionShape(
        family,
        c.hidden_size,
        c.num_hidden_layers,
        c.intermediate_size,
        c.num_attention_heads,
        c.image_size,
        c.patch_size,
        c.num_channels,
        has_cls,
        head,
    )


VISION_FAMILIES: dict[str, Callable[..., VisionShape]] = {
    "clip_vision_model": lambda c: _vision_shape(c, "clip", True, False),
    "chinese_clip_vision_model": lambda c: _vision_shape(c, "chinese_clip", True, False),
    "siglip_vision_model": lambda c: _vision_shape(c, "siglip", False, c.vision_use_head),
}


def lm_shape(config) -> LMShape:
    if config.model_type not in LM_FAMILIES:
        raise ValueError(
            f"no parameter formula for LM type {config.model_type!r}; known: {', '.join(LM_FAMILIES)}"
        )
    return LM_FAMILIES[config.model_type](config)


def vision_shape(config) -> VisionShape:
    if config.model_type not in VISION_FAMILIES:
        raise ValueError(
            f"no parameter formula for vision type {config.model_type!r}; known: {', '.join(VISION_FAMILIES)}"
        )
    return VISION_FAMILIES[config.model_type](config)


def lora_params(shape: LMShape | VisionShape, lora: LoraConfig) -> int:
    """Adapter parameters peft adds: r x (in + out) per targeted linear of every layer ("all-linear"
    targets every linear of the layers; output heads are excluded, as peft does)."""
    targets = lora.target_modules
    chosen = [io for name, io in shape.linears().items() if targets == ("all-linear",) or name in targets]
    return shape.layers * lora.r * sum(a + b for a, b in chosen)


EXPERT_LINEARS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj")


def visual_expert_params(shape: LMShape) -> int:
    """Parameters of deep fusion's visual experts (`seechat.model.fusion`): per layer a copy of the
    q/k/v projections and of the MLP, with their biases."""
    weights = sum(a * b for name, (a, b) in shape.linears().items() if name in EXPERT_LINEARS)
    biases = (shape.q_dim + 2 * shape.kv_dim) * shape.qkv_bias
    biases += (2 * shape.intermediate + shape.hidden) * shape.mlp_bias
    return shape.layers * (weights + biases)


def checkpointed_layers(layers: int, every: int) -> int:
    """How many of `layers` decoder layers recompute their activations when every `every`-th one
    does (`seechat.model.build.enable_activation_checkpointing`): layers 0, every, 2 * every, ..."""
    return -(-layers // every)
