"""Build a SeeChatModel and its processor from the two base experts named in a ModelConfig.

`build(cfg)` loads the vision encoder and the causal LM with the normal transformers loaders
(`AutoModel`, `AutoModelForCausalLM`, `AutoTokenizer`, `AutoImageProcessor`: a local dir or a hub
id), adds the image token to the tokenizer when missing, and checks that tokenizer and LM agree.
`apply_trainable` then freezes / unfreezes / LoRA-wraps the parameter groups a stage trains.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from seechat.config import LoraConfig, ModelConfig, TrainableConfig
from seechat.data.processor import SeeChatProcessor
from seechat.model.bridges import build_bridge
from seechat.model.fusion import build_visual_experts
from seechat.model.modeling import SeeChatModel
from seechat.model.sizes import checkpointed_layers
from seechat.model.vision import VisionTower, load_vision_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_language_model(path: str, cfg: ModelConfig) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[cfg.dtype], attn_implementation=cfg.attn_implementation
    )


def fit_embeddings(lm: PreTrainedModel, tokenizer) -> None:
    """Make room for tokens the tokenizer has beyond the LM's embedding rows (e.g. `<image>`).

    Most real LLMs reserve spare rows, so this is usually a no-op. When it is not, the new rows
    are zeroed rather than randomly initialised: image-token rows are always overwritten by image
    features, and a deterministic value makes a frozen-LM checkpoint reload bit-identically.
    """
    rows = lm.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= rows:
        return
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        lm.get_input_embeddings().weight[rows:].zero_()
        out = lm.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != lm.get_input_embeddings().weight.data_ptr():
            out.weight[rows:].zero_()


def check_tokenizer_matches(lm: PreTrainedModel, tokenizer, processor: SeeChatProcessor) -> None:
    """Fail fast on a tokenizer that cannot belong to this LM (ids beyond the embedding table)."""
    rows = lm.get_input_embeddings().weight.shape[0]
    top = max(tokenizer.get_vocab().values())
    if top >= rows:
        raise ValueError(
            f"tokenizer/LLM mismatch: the tokenizer has token ids up to {top} but the language model "
            f"has only {rows} embedding rows; use the tokenizer that belongs to this LLM"
        )
    if processor.image_token_id >= rows:
        raise ValueError(f"image token id {processor.image_token_id} is outside the LM's {rows} embeddings")


def assemble(
    cfg: ModelConfig, vision_model: PreTrainedModel, lm: PreTrainedModel, tokenizer, image_processor
) -> tuple[SeeChatModel, SeeChatProcessor]:
    """Stitch loaded experts together with a freshly initialised bridge."""
    vision_tower = VisionTower(vision_model, cfg.vision)
    bridge = build_bridge(
        cfg.bridge,
        vision_tower.hidden_size,
        lm.config.get_text_config().hidden_size,
        vision_tower.num_features,
    ).to(DTYPES[cfg.dtype])
    processor = SeeChatProcessor(
        tokenizer, image_processor, bridge.num_tokens, image_token=cfg.image_token, max_length=cfg.max_length
    )
    fit_embeddings(lm, tokenizer)
    check_tokenizer_matches(lm, tokenizer, processor)
    experts = build_visual_experts(cfg.fusion, lm)  # copies of the LM's layers: after fit_embeddings
    model = SeeChatModel(cfg, vision_tower, bridge, lm, processor.image_token_id, experts)
    return model, processor


def build(cfg: ModelConfig) -> tuple[SeeChatModel, SeeChatProcessor]:
    """A new SeeChatModel from the base experts named in `cfg` (the bridge is untrained)."""
    if not cfg.vision.path or not cfg.lm.path:
        raise ValueError("model.vision.path and model.lm.path must name the base experts (a dir or hub id)")
    vision_model = load_vision_model(cfg.vision.path, DTYPES[cfg.dtype])
    lm = load_language_model(cfg.lm.path, cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.lm.tokenizer_path or cfg.lm.path)
    image_processor = AutoImageProcessor.from_pretrained(cfg.vision.path)
    return assemble(cfg, vision_model, lm, tokenizer, image_processor)


def add_visual_experts(model: SeeChatModel) -> SeeChatModel:
    """The deep-fusion twin of a shallow model: the same vision tower, bridge and LM, plus visual
    experts copied from the LM's layers (a deep stage 2 starting from a shallow stage-1 checkpoint)."""
    if model.visual_experts is not None:
        return model
    if _is_peft(model.language_model):
        raise ValueError("deep fusion needs a plain LM; merge the LoRA adapter first (seechat merge-lora)")
    cfg = dataclasses.replace(model.cfg, fusion="deep")
    lm = model.language_model
    experts = build_visual_experts("deep", lm)
    deep = SeeChatModel(cfg, model.vision_tower, model.bridge, lm, model.image_token_id, experts)
    deep.provenance = dict(model.provenance)
    return deep.to(model.device)


# ---------------------------------------------------------------- trainable parameter groups


def _peft_lora(module: nn.Module, lora: LoraConfig, task_type: str | None):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = lora.target_modules
    target = "all-linear" if targets == ("all-linear",) else list(targets)
    peft_cfg = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target, task_type=task_type
    )
    return get_peft_model(module, peft_cfg)


def _is_peft(module: nn.Module) -> bool:
    return hasattr(module, "peft_config")


def _set_group(model: SeeChatModel, part: str, mode: str, lora: LoraConfig) -> None:
    holder, attr, task = (
        (model, "language_model", "CAUSAL_LM") if part == "lm" else (model.vision_tower, "model", None)
    )
    module = getattr(holder, attr)
    if mode == "lora":
        if not _is_peft(module):
            module = _peft_lora(module, lora, task)
            setattr(holder, attr, module)
        for name, p in module.named_parameters():
            p.requires_grad_("lora_" in name)
        model.provenance[part] = "lora"
        return
    if _is_peft(module):  # a LoRA-trained part continuing frozen or full: fold the adapter in
        module = module.merge_and_unload()
        setattr(holder, attr, module)
        model.provenance[part] = "full"
    module.requires_grad_(mode == "full")
    if mode == "full":
        model.provenance[part] = "full"


def apply_trainable(model: SeeChatModel, trainable: TrainableConfig) -> None:
    """Set `requires_grad` per group: vision / bridge / lm each frozen, full or (vision, lm) LoRA;
    with deep fusion the visual experts frozen or full, and the LM must stay frozen."""
    if model.visual_experts is not None and trainable.lm != "frozen":
        raise ValueError(
            f"model.fusion=deep keeps the language model frozen (the text-only superset guarantee); "
            f"trainable.lm={trainable.lm} would change it. Train the visual experts (trainable.experts=full) "
            "with trainable.lm=frozen, or use model.fusion=shallow"
        )
    model.requires_grad_(False)
    model.bridge.requires_grad_(trainable.bridge == "full")
    if model.visual_experts is not None:
        model.visual_experts.requires_grad_(trainable.experts == "full")
    _set_group(model, "vision", trainable.vision, trainable.lora)
    _set_group(model, "lm", trainable.lm, trainable.lora)
    if trainable.vision != "frozen":
        _freeze_unreachable(model.vision_tower)


def enable_activation_checkpointing(lm: PreTrainedModel, every: int = 1) -> int:
    """Recompute the activations of every `every`-th decoder layer of `lm` in the backward pass
    instead of keeping them (1: all layers; 2: half, ...): memory for compute, layer by layer
    (selective activation checkpointing, as torchtitan's and Megatron's). The other layers keep
    theirs. -> how many layers recompute."""
    if every < 1:
        raise ValueError(f"train.checkpoint_every must be at least 1 (1 = every layer), not {every}")
    lm.activation_checkpointing_enable()  # transformers 5's name for gradient checkpointing
    layers = list(lm.get_decoder().layers)
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i % every == 0
    return checkpointed_layers(len(layers), every)


def compile_layers(lm: PreTrainedModel) -> int:
    """`torch.compile` the parts of every decoder layer of `lm` in place (`nn.Module.compile`): its
    norms, attention and MLP, whatever the architecture names them. Their element-wise work (the
    RMSNorm's statistics, the rotary embedding, the gated activation) then runs as a few fused
    kernels forward and backward. This is regional compilation: the layers share their code, so
    each part compiles once, and the other layers reuse the compiled code (recompiling once when
    sequence lengths first change, then treating them as dynamic).

    The parts are compiled, not the layer: transformers' activation checkpointing wraps the
    layer's `forward`, and a compiled region around the checkpoint runs its inside eagerly.
    Parameters, state_dict keys and saved checkpoints are unchanged. -> modules compiled."""
    parts = [part for layer in lm.get_decoder().layers for part in layer.children()]
    for part in parts:
        part.compile()
    return len(parts)


def _freeze_unreachable(tower: nn.Module) -> None:
    """Freeze vision parameters the selected feature layer never uses (layers above it, the final
    norm, pooling heads): they cannot learn, and DDP would stall waiting for their gradients.
    Found by one probe backward pass rather than by knowing each architecture's module names."""
    probe = torch.zeros(1, 3, tower.image_size, tower.image_size, dtype=tower.dtype, device=tower.device)
    trainable = [p for p in tower.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = None
    tower(probe).float().sum().backward()
    for p in trainable:
        if p.grad is None:
            p.requires_grad_(False)
        p.grad = None


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]
