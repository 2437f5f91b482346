"""Typed, immutable configuration: dataclasses are the one source of truth.

A run is described by a `RunConfig` (model architecture, which parts train, data, optimisation).
It is read from YAML and then patched with dotted `key=value` overrides from the command line:

    cfg = load_config("seechat/mini/recipes/stage1.yaml", ["train.lr=1e-3", "model.bridge.type=qformer"])

Unknown keys are an error that lists the valid ones; values are checked against their annotated
types (including `Literal` choices) and numbers against their ranges (`Annotated[int, Range(...)]`:
a batch size of 0 or a dropout of 1.5 is refused when the config is read, naming the key and the
range, not deep inside a run). Configs are frozen: code never mutates them at run time —
derive a new one with `dataclasses.replace` where a variant is needed.

This module knows nothing about torch; it only parses and validates.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml


@dataclass(frozen=True)
class Range:
    """The values a number field may take, checked when a config is read; an open end excludes it."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, v: float) -> bool:
        above = self.low is None or (v > self.low if self.low_open else v >= self.low)
        below = self.high is None or (v < self.high if self.high_open else v <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


Count = Annotated[int, Range(low=1)]  # 1, 2, ...
CountOrZero = Annotated[int, Range(low=0)]  # 0 has a meaning the field's comment gives (off, all, auto)
PositiveFloat = Annotated[float, Range(low=0, low_open=True)]
NonNegativeFloat = Annotated[float, Range(low=0)]
Fraction = Annotated[float, Range(low=0, high=1)]
Probability = Annotated[float, Range(low=0, high=1, high_open=True)]  # a dropout rate

Trainable = Literal["frozen", "full", "lora"]
LossAverage = Literal["token", "sample", "square"]  # `train.loss_average` (seechat.train.averaging)
Tracker = Literal["tensorboard", "wandb"]  # experiment trackers of `train.report_to` (seechat.train.trackers)


class ConfigError(ValueError):
    """A config file or override is malformed; the message says what and where."""


@dataclass(frozen=True)
class VisionConfig:
    """The vision expert: any transformers vision model loadable with `AutoModel`.

    `path` may be a vision-only checkpoint (CLIPVisionModel, SiglipVisionModel …) or a full
    dual-encoder (CLIPModel, ChineseCLIPModel …), whose `vision_model` is then used.
    """

    path: str = ""
    feature_layer: int = -2  # index into hidden_states; -2 = penultimate layer, as LLaVA
    select: Literal["patch", "cls_patch"] = "patch"  # drop the CLS token, or keep it


@dataclass(frozen=True)
class BridgeConfig:
    """The learnable bridge from vision features to LM embeddings (see `seechat.model.bridges`)."""

    type: Literal["linear", "mlp2x_gelu", "qformer", "resampler"] = "mlp2x_gelu"
    num_queries: Count = 32  # qformer / resampler: LM tokens per image
    num_layers: Count = 2  # qformer: number of (self-attn, cross-attn, FFN) blocks
    num_heads: Count = 8  # qformer / resampler
    hidden_size: CountOrZero = 0  # qformer / resampler internal width; 0 = the vision width
    merge: Count = 1  # linear / mlp2x_gelu: concatenate merge x merge neighbouring patches into one token


@dataclass(frozen=True)
class LMConfig:
    """The language expert: any transformers `AutoModelForCausalLM` plus its tokenizer."""

    path: str = ""
    tokenizer_path: str = ""  # "" = same as `path`


@dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    # shallow: image features enter at the LM's input only (every bridge); deep: plus a CogVLM-style
    # visual expert (own QKV and MLP at image positions) in every LM layer (seechat.model.fusion)
    fusion: Literal["shallow", "deep"] = "shallow"
    image_token: str = "<image>"  # the marker in text; also the reserved token the processor expands
    max_length: Count = 2048  # tokens per training sample, image tokens included
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"


@dataclass(frozen=True)
class LoraConfig:
    r: Count = 16
    alpha: Count = 32
    dropout: Probability = 0.05
    target_modules: tuple[str, ...] = ("all-linear",)


@dataclass(frozen=True)
class TrainableConfig:
    """Which parameter groups train: a stage is this block, not a code path."""

    vision: Trainable = "frozen"
    bridge: Literal["frozen", "full"] = "full"
    lm: Trainable = "frozen"
    experts: Literal["frozen", "full"] = "full"  # model.fusion=deep: the visual experts (no-op when shallow)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass(frozen=True)
class DataConfig:
    """Where training examples come from.

    `kind: pairs` streams webdataset shards of (image, caption) and turns each pair into a
    one-turn conversation with an instruction drawn from `pair_instructions`;
    `kind: conversations` reads conversation JSON/JSONL (LLaVA, ShareGPT or seechat format).
    """

    kind: Literal["pairs", "conversations"] = "pairs"
    paths: tuple[str, ...] = ()  # shard globs / brace patterns, or JSON(L) files
    image_root: str = ""  # conversations: image paths are relative to this ("" = the file's folder)
    text_field: str = "txt"  # pairs: "txt" or "json:<field>"
    pair_instructions: tuple[str, ...] = ("<image>\n请用一句话描述这张图片。",)
    shuffle_buffer: CountOrZero = 1000  # 0 = stream order
    num_workers: CountOrZero = 0  # 0 = load in the training process
    eval_paths: tuple[str, ...] = ()  # held-out data of the same kind; its loss is evaluated during training
    max_sample_mb: Count = 64  # pairs: a sample whose tar members together are larger is skipped unread


@dataclass(frozen=True)
class OptimConfig:
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.0
    betas: tuple[Probability, Probability] = (0.9, 0.999)
    warmup_steps: CountOrZero = 0
    min_lr_ratio: Fraction = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: NonNegativeFloat = 1.0  # max global gradient norm; 0 = no clipping


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "runs/train"
    init_from: str = ""  # a seechat checkpoint whose weights start this run (e.g. stage 1 -> 2)
    max_steps: Count = 100  # optimizer steps
    batch_size: Count = 8  # per device, per micro-step
    grad_accum: Count = 1
    seed: int = 0
    log_every: Count = 10
    save_every: CountOrZero = 0  # 0 = only at the end
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    checkpoint_every: Count = 1  # with gradient_checkpointing: recompute every k-th LM layer (1 = all)
    group_by_length: bool = True  # conversations: batch similar lengths to waste less on padding
    # a micro-batch's samples end to end in one row, no padding (the same samples and loss; the LM
    # attends within each sample through varlen attention, seechat.model.varlen); false: padded rows
    padding_free: bool = True
    # torch.compile each LM layer's norms, attention and MLP (seechat.model.build.compile_layers):
    # fused element-wise kernels for speed; the first steps compile. Not with FSDP or deep fusion
    compile: bool = False
    # the LM head and its cross-entropy fused, chunk by chunk (seechat.model.fused_loss): the loss
    # without the (tokens x vocabulary) logits; an LM whose logits are more than its head keeps the plain loss
    fused_loss: bool = True
    loss_average: LossAverage = "token"  # how a step averages its token losses: per token, sample, or sqrt
    eval_every: CountOrZero = 0  # with data.eval_paths: held-out loss every N steps (0 = only at the end)
    eval_batches: CountOrZero = 0  # global batches per evaluation (0 = the whole of data.eval_paths)
    report_to: tuple[Tracker, ...] = ()  # experiment trackers, besides train/metrics.jsonl and loss.png


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---------------------------------------------------------------- dict <-> dataclass


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(_dotted(where, k) for k in unknown)}; "
            f"valid keys{' under ' + where if where else ''}: {', '.join(names)}"
        )
    kwargs = {k: _coerce(hints[k], v, _dotted(where, k)) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The plain, JSON/YAML-ready form of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _dotted(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *meta = typing.get_args(tp)
        value = _coerce(base, value, where)
        for bounds in meta:
            if isinstance(bounds, Range) and value not in bounds:
                raise ConfigError(f"{where}: {value!r} is out of range; it must be {bounds}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value is False and "no" in choices:
            value = "no"  # YAML 1.1 reads a bare `no` as false: `train.mixed_precision=no` means "no"
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (types.UnionType, typing.Union):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None) and value is None:
                return None
            try:
                return _coerce(arm, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} matches none of {tp}")
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported config type {tp}")


# ---------------------------------------------------------------- YAML + overrides


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a nested dict, returning a copy."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = _parse_value(raw)
    return out


def _parse_value(raw: str) -> Any:
    """A YAML scalar/list when it parses as one, else the raw string (e.g. brace shard patterns)."""
    if not raw.strip():
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None, cls: type = RunConfig) -> Any:
    """Read a YAML recipe (or start from defaults when `path` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, data)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), allow_unicode=True, sort_keys=False), encoding="utf-8")
