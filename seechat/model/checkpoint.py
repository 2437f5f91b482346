"""Checkpoints: a self-describing directory, safetensors only, written atomically.

    config.json          {"format": "seechat", "model": <resolved ModelConfig>, "parts": {...}}
    bridge.safetensors   always (it is small)
    visual_experts.safetensors   model.fusion=deep: the per-layer visual experts (seechat.model.fusion)
    vision_tower/        only when the vision encoder changed ("full"); vision_adapter/ for LoRA
    language_model/      only when the LM changed ("full");              lm_adapter/ for LoRA
    tokenizer/           the LLM tokenizer with the image token and chat template
    image_processor/     the vision encoder's preprocessing

A part that did not change ("base") is reloaded from the path in the config, so a stage-1
checkpoint is just the bridge plus metadata. Loading needs no flags: everything is in config.json.
The directory is written crash-safely (`seechat.atomic`): a kill mid-save never leaves a
half-written checkpoint where a good one was, and a kill between the final renames leaves the
previous checkpoint set aside, where loading finds it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, AutoTokenizer

from seechat.atomic import atomic_directory, check_output_apart, existing
from seechat.config import ModelConfig, from_dict, to_dict
from seechat.data.processor import SeeChatProcessor
from seechat.model.build import DTYPES, assemble, load_language_model
from seechat.model.modeling import SeeChatModel
from seechat.model.vision import load_vision_model

FORMAT = "seechat"
CONFIG_NAME = "config.json"
BRIDGE_NAME = "bridge.safetensors"
EXPERTS_NAME = "visual_experts.safetensors"


def _part_mode(model: SeeChatModel, part: str) -> str:
    module = model.language_model if part == "lm" else model.vision_tower.model
    if hasattr(module, "peft_config"):
        return "lora"
    trains = any(p.requires_grad for p in module.parameters())
    return "full" if trains or model.provenance[part] == "full" else "base"


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def write_checkpoint(
    model: SeeChatModel,
    processor: SeeChatProcessor,
    directory: str | Path,
    extra: dict | None = None,
    keep: tuple[str, ...] = (),
    state: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Save model + processor into `directory` atomically; returns the final path.
    `keep`: sub-folders of an existing `directory` to carry over (see `atomic_directory`).
    `state`: full values of the trainable parameters by name (`seechat.train.state`); they replace
    the model's own values where given, which is how a model whose parameters are FSDP shards saves."""
    final = Path(directory)
    with atomic_directory(final, keep) as tmp:
        parts = {"vision": _part_mode(model, "vision"), "lm": _part_mode(model, "lm")}
        save_file(
            _contiguous(_values(model.bridge, "bridge.", state) or model.bridge.state_dict()),
            tmp / BRIDGE_NAME,
        )
        if model.visual_experts is not None:
            experts = model.visual_experts
            save_file(
                _contiguous(_values(experts, "visual_experts.", state) or experts.state_dict()),
                tmp / EXPERTS_NAME,
            )
        _save_part(
            model.vision_tower.model,
            parts["vision"],
            tmp,
            "vision_tower",
            "vision_adapter",
            _values(model.vision_tower.model, "vision_tower.model.", state),
        )
        _save_part(
            model.language_model,
            parts["lm"],
            tmp,
            "language_model",
            "lm_adapter",
            _values(model.language_model, "language_model.", state),
        )
        processor.save_pretrained(tmp)
        meta = {
            "format": FORMAT,
            "model": to_dict(model.cfg),
            "parts": parts,
            "num_image_tokens": model.num_image_tokens,
            "image_token_id": model.image_token_id,
            **(extra or {}),
        }
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, ensure_ascii=False, indent=2), encoding="utf-8")
    return final


def _values(module: torch.nn.Module, prefix: str, state: Mapping[str, torch.Tensor] | None) -> dict | None:
    """The module's state dict with `state`'s full values (keys `prefix` + name) where it has them;
    None (the module's own) without `state`."""
    if state is None:
        return None
    return {k: state.get(prefix + k, v) for k, v in module.state_dict().items()}


def _save_part(module, mode: str, root: Path, full_name: str, adapter_name: str, values: dict) -> None:
    if mode == "full":
        module.save_pretrained(root / full_name, state_dict=values, safe_serialization=True)
    elif mode == "lora":
        module.save_pretrained(root / adapter_name, state_dict=values, safe_serialization=True)


def read_meta(directory: str | Path) -> dict:
    d = existing(directory)
    path = d / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{d} is not a seechat checkpoint: {CONFIG_NAME} is missing")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a seechat checkpoint config (format={meta.get('format')!r})")
    return meta


def load_checkpoint(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[SeeChatModel, SeeChatProcessor]:
    """Load model and processor from a checkpoint directory written by `write_checkpoint`."""
    d = existing(directory)
    meta = read_meta(d)
    cfg: ModelConfig = from_dict(ModelConfig, meta["model"])
    parts = meta["parts"]
    dtype = DTYPES[cfg.dtype]

    vision = load_vision_model(
        str(d / "vision_tower") if parts["vision"] == "full" else cfg.vision.path, dtype
    )
    lm = load_language_model(str(d / "language_model") if parts["lm"] == "full" else cfg.lm.path, cfg)
    tokenizer = AutoTokenizer.from_pretrained(d / "tokenizer")
    image_processor = AutoImageProcessor.from_pretrained(d / "image_processor")
    model, processor = assemble(cfg, vision, lm, tokenizer, image_processor)

    model.bridge.load_state_dict(load_file(d / BRIDGE_NAME))
    if model.visual_experts is not None:
        model.visual_experts.load_state_dict(load_file(d / EXPERTS_NAME))
    if parts["vision"] == "lora":
        from peft import PeftModel

        model.vision_tower.model = PeftModel.from_pretrained(model.vision_tower.model, d / "vision_adapter")
    if parts["lm"] == "lora":
        from peft import PeftModel

        model.language_model = PeftModel.from_pretrained(model.language_model, d / "lm_adapter")
    for part, mode in parts.items():
        model.provenance[part] = mode
    if model.num_image_tokens != meta["num_image_tokens"]:
        raise ValueError(
            f"{d}: bridge gives {model.num_image_tokens} image tokens, "
            f"checkpoint says {meta['num_image_tokens']}"
        )
    model.requires_grad_(False)
    return model.to(device).eval(), processor


def merge_lora(directory: str | Path, out: str | Path) -> Path:
    """Fold LoRA adapters into full weights: a checkpoint any engine can load without peft.
    `out` must lie outside `directory` (OutputOverlapError): writing it would replace the source."""
    check_output_apart(directory, out)
    model, processor = load_checkpoint(directory)
    if model.provenance["lm"] == "lora":
        model.language_model = model.language_model.merge_and_unload()
        model.provenance["lm"] = "full"
    if model.provenance["vision"] == "lora":
        model.vision_tower.model = model.vision_tower.model.merge_and_unload()
        model.provenance["vision"] = "full"
    return write_checkpoint(model, processor, out)
