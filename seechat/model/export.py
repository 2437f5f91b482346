"""Export a seechat checkpoint to another framework's layout: `seechat export --format llava-hf`.

An `mlp2x_gelu` model *is* a LLaVA-1.5 model: same vision feature layer, same Linear-GELU-Linear
projector with the same parameter names, same image-token merge. The export writes the
transformers `LlavaForConditionalGeneration` layout (config.json with `model_type: llava`,
`model.safetensors`, tokenizer, image processor, processor and generation configs), which
transformers, vLLM, SGLang and llama.cpp's converters read. LoRA parts are folded in first.
The chat template (processor's and tokenizer's) renders messages whose content is a string with
`<image>` markers and transformers' list-of-parts form (`[{"type": "image"}, {"type": "text", ...}]`)
alike, so `AutoProcessor.apply_chat_template` takes either (seechat.data.conversation).

Other bridges (`linear`, `qformer`, `resampler`) have no LLaVA counterpart and are refused with a
message that says so, and so is a deep-fusion model (its per-layer visual experts have no place in
LLaVA's layout); this module does not approximate one architecture with another.
"""

from __future__ import annotations

from pathlib import Path

import torch

from seechat.atomic import OutputOverlapError, atomic_directory, check_output_apart
from seechat.data.conversation import accept_content_parts
from seechat.model.modeling import SeeChatModel

FORMATS = ("llava-hf",)


class ExportError(ValueError):
    """The checkpoint cannot be written in the requested layout; the message says why."""


def _has_cls(model: SeeChatModel) -> bool:
    """Whether the encoder's hidden states carry a CLS token: measured with a probe image, not
    guessed from the class name."""
    tower = model.vision_tower
    probe = torch.zeros(1, 3, tower.image_size, tower.image_size, dtype=tower.dtype, device=tower.device)
    with torch.no_grad():
        hidden = tower.model(pixel_values=probe, output_hidden_states=True).hidden_states[tower.feature_layer]
    return hidden.shape[1] == tower.num_patches + 1


def _vision_select_strategy(model: SeeChatModel) -> str:
    """LLaVA's `vision_feature_select_strategy`: "default" drops the CLS token, "full" keeps all."""
    return "default" if _has_cls(model) and model.vision_tower.select == "patch" else "full"


def llava_config(model: SeeChatModel, stop_token_ids: list[int], pad_token_id: int | None):
    from transformers import LlavaConfig

    text_config = model.language_model.config
    cfg = LlavaConfig(
        vision_config=model.vision_tower.model.config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=model.image_token_id,
        image_seq_length=model.num_image_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=_vision_select_strategy(model),
        vision_feature_layer=model.vision_tower.feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    cfg.architectures = ["LlavaForConditionalGeneration"]
    cfg.eos_token_id = stop_token_ids
    cfg.pad_token_id = pad_token_id
    return cfg


def _check_llava_shaped(model: SeeChatModel) -> None:
    if model.visual_experts is not None:
        raise ExportError(
            "--format llava-hf cannot hold a deep-fusion model (model.fusion=deep): transformers' LLaVA runs "
            "the plain LM over image tokens and has no per-layer visual expert weights, so the export would "
            "silently drop them. Serve it with `seechat serve`"
        )
    if model.cfg.bridge.type != "mlp2x_gelu" or model.cfg.bridge.merge != 1:
        raise ExportError(
            "--format llava-hf needs the mlp2x_gelu bridge without patch merging (LLaVA-1.5's projector); "
            f"this checkpoint uses {model.cfg.bridge.type!r} with merge={model.cfg.bridge.merge}, "
            "which transformers' LLaVA has no layer for. Serve it with "
            "`seechat serve`, or train an mlp2x_gelu bridge (model.bridge.type=mlp2x_gelu) to export"
        )


def to_llava(model: SeeChatModel, stop_token_ids: list[int], pad_token_id: int | None):
    """An in-memory `LlavaForConditionalGeneration` holding a copy of this model's weights."""
    from transformers import LlavaForConditionalGeneration

    _check_llava_shaped(model)
    lm = model.language_model
    if hasattr(lm, "peft_config"):
        lm = lm.merge_and_unload()
    vision = model.vision_tower.model
    if hasattr(vision, "peft_config"):
        vision = vision.merge_and_unload()
    dtype = next(lm.parameters()).dtype
    cfg = llava_config(model, stop_token_ids, pad_token_id)
    llava = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    base = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
    _load_exact(llava.model.vision_tower, vision.state_dict(), "vision tower")
    _load_exact(llava.model.multi_modal_projector, model.bridge.state_dict(), "projector")
    _load_exact(llava.model.language_model, base.state_dict(), "language model")
    llava.lm_head.weight.data.copy_(lm.get_output_embeddings().weight.data)
    llava.generation_config.eos_token_id = stop_token_ids
    llava.generation_config.pad_token_id = pad_token_id
    return llava


def llava_view(model: SeeChatModel, stop_token_ids: list[int], pad_token_id: int | None):
    """transformers' `LlavaForConditionalGeneration` whose parts *are* this model's modules (vision
    tower, bridge as the projector, the LM's decoder and head): no copy, the same weights and the
    same `requires_grad` on both sides, so the two can be timed side by side on one card (the
    benchmarks do). LoRA-wrapped parts are refused (merge them first, as `to_llava` does)."""
    from transformers import LlavaForConditionalGeneration

    _check_llava_shaped(model)
    lm, vision = model.language_model, model.vision_tower.model
    if hasattr(lm, "peft_config") or hasattr(vision, "peft_config"):
        raise ExportError("llava_view needs merged weights: a LoRA-wrapped part cannot be shared with LLaVA")
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(llava_config(model, stop_token_ids, pad_token_id))
    llava.model.vision_tower = vision
    llava.model.multi_modal_projector = model.bridge  # LLaVA's projector: same names and forward
    llava.model.language_model = lm.get_decoder()
    llava.lm_head = lm.get_output_embeddings()
    left = [n for n, t in [*llava.named_parameters(), *llava.named_buffers()] if t.is_meta]
    if left:
        raise ExportError(f"LLaVA tensors not taken from the seechat model: {left}")
    llava.generation_config.eos_token_id = stop_token_ids
    llava.generation_config.pad_token_id = pad_token_id
    return llava


def llava_inputs(llava, batch: dict) -> dict:
    """A seechat training batch (padded: `input_ids`, `attention_mask`, `labels`, `pixel_values` or
    None for a text-only batch) as `llava_view`'s keyword arguments, the way a plain loop calls
    transformers' LLaVA: `llava(**llava_inputs(llava, batch)).loss` (logits at every position, then
    the mean loss over the labelled ones)."""
    pixels = batch["pixel_values"]
    pixels = None if pixels is None else pixels.to(llava.model.vision_tower.dtype)
    return {**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}, "pixel_values": pixels}


def _load_exact(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    # Non-persistent buffers (position_ids, rotary inv_freq) are rebuilt by the module itself.
    missing = [k for k in missing if k not in dict(module.named_buffers())]
    if missing or unexpected:
        raise ExportError(
            f"{what}: parameter names do not map onto LLaVA's (missing {missing}, unexpected {unexpected})"
        )


def export_llava_hf(directory: str | Path, out: str | Path) -> Path:
    """Write `directory` (a seechat checkpoint) to `out` in the transformers LLaVA layout, crash-safely
    (`seechat.atomic`). An `out` that is the checkpoint, inside it or around it is refused: writing
    it would replace the source."""
    from transformers import LlavaProcessor

    from seechat.model.checkpoint import load_checkpoint

    try:
        check_output_apart(directory, out)
    except OutputOverlapError as e:
        raise ExportError(str(e)) from None
    model, processor = load_checkpoint(directory)
    llava = to_llava(model, processor.stop_token_ids, processor.tokenizer.pad_token_id)
    final = Path(out)
    with atomic_directory(final) as tmp:
        llava.save_pretrained(tmp, safe_serialization=True)
        tok = processor.tokenizer
        tok.chat_template = accept_content_parts(tok.chat_template, processor.image_token)
        hf_processor = LlavaProcessor(
            image_processor=processor.image_processor,
            tokenizer=tok,
            patch_size=model.vision_tower.model.config.patch_size,
            vision_feature_select_strategy=llava.config.vision_feature_select_strategy,
            image_token=processor.image_token,
            num_additional_image_tokens=1 if _has_cls(model) else 0,
            chat_template=tok.chat_template,
        )
        hf_processor.save_pretrained(tmp)
    return final
