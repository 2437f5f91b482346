"""Parameter counts by formula equal `sum(p.numel())` of the real transformers models: tiny ones of
every supported family, and the registry's full-size presets built on the meta device."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    ChineseCLIPConfig,
    ChineseCLIPVisionConfig,
    CLIPVisionConfig,
    Glm4Config,
    LlamaConfig,
    Qwen2Config,
    SiglipVisionConfig,
)

from seechat.config import LoraConfig
from seechat.model.sizes import (
    ARCHITECTURES,
    expert_config,
    lm_shape,
    lora_params,
    vision_shape,
    visual_expert_params,
    with_layers,
)

LM_CONFIGS = {
    "qwen2": Qwen2Config(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    ),
    "qwen2-tied": Qwen2Config(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=True,
    ),
    "llama": LlamaConfig(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=False,
    ),
    "llama-biases": LlamaConfig(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,
        mlp_bias=True,
    ),
    "glm4": Glm4Config(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        pad_token_id=0,
        eos_token_id=1,
    ),
}
VISION = dict(
    hidden_size=40,
    intermediate_size=72,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=48,
    patch_size=8,
)
VISION_CONFIGS = {
    "clip": CLIPVisionConfig(**VISION),
    "chinese_clip": ChineseCLIPVisionConfig(**VISION),
    "siglip": SiglipVisionConfig(**VISION),
    "siglip-no-head": SiglipVisionConfig(**VISION, vision_use_head=False),
}


def numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", LM_CONFIGS)
def test_lm_parameter_formula_counts_the_real_model(name):
    config = LM_CONFIGS[name]
    assert lm_shape(config).params == numel(AutoModelForCausalLM.from_config(config))


@pytest.mark.parametrize("name", VISION_CONFIGS)
def test_vision_parameter_formula_counts_the_real_model(name):
    config = VISION_CONFIGS[name]
    assert vision_shape(config).params == numel(AutoModel.from_config(config))


@pytest.mark.parametrize("hub_id", ARCHITECTURES)
def test_registry_presets_count_the_full_size_models(hub_id):
    config = expert_config(hub_id)
    with torch.device("meta"):  # full size, no memory
        model = (AutoModelForCausalLM if config.model_type == "qwen2" else AutoModel).from_config(config)
    shape = lm_shape(config) if config.model_type == "qwen2" else vision_shape(config)
    assert shape.params == numel(model)
    if hub_id == "Qwen/Qwen2.5-7B-Instruct":
        assert shape.params == 7_615_616_512  # the published size


def test_a_dual_encoder_directory_yields_its_vision_half(tmp_path):
    ChineseCLIPConfig(vision_config=VISION).save_pretrained(tmp_path)
    assert vision_shape(expert_config(str(tmp_path))).hidden == 40
    with pytest.raises(ValueError, match="known: Qwen/Qwen2.5-7B"):
        expert_config("nobody/unknown-model")


def test_lora_counts_what_peft_adds():
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = LM_CONFIGS["qwen2"]
    model = AutoModelForCausalLM.from_config(config)
    before = numel(model)
    peft_model = get_peft_model(
        model, PeftLoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    assert numel(peft_model) - before == lora_params(lm_shape(config), LoraConfig(r=4))


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_visual_expert_formula_counts_the_real_experts(name):
    from seechat.model.fusion import VisualExperts

    config = LM_CONFIGS[name]
    experts = VisualExperts(AutoModelForCausalLM.from_config(config))
    assert numel(experts) == visual_expert_params(lm_shape(config))


def test_with_layers_keeps_every_field_but_the_depth():
    for full in (
        expert_config("Qwen/Qwen2.5-7B"),
        expert_config("OFA-Sys/chinese-clip-vit-large-patch14-336px"),
    ):
        shallow = with_layers(full, 2)
        assert type(shallow) is type(full) and shallow.num_hidden_layers == 2
        rest = {k: v for k, v in full.to_dict().items() if k not in ("num_hidden_layers", "layer_types")}
        assert {k: shallow.to_dict()[k] for k in rest} == rest
    assert len(with_layers(expert_config("Qwen/Qwen2.5-7B"), 2).layer_types) == 2  # derived again, not 28
    with pytest.raises(ValueError, match="layers must be >= 1"):
        with_layers(full, 0)
