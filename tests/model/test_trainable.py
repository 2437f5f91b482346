"""Each trainable setting trains exactly its parameter group; everything else gets no gradient."""

from __future__ import annotations

import pytest
import torch

from seechat.config import TrainableConfig
from seechat.data.collate import collate
from seechat.model import apply_trainable, build
from seechat.model.build import compile_layers, enable_activation_checkpointing
from seechat.model.sizes import checkpointed_layers
from tests.helpers import CONVERSATION, model_config

CASES = {
    "stage1 bridge only": TrainableConfig(vision="frozen", bridge="full", lm="frozen"),
    "stage2 full lm": TrainableConfig(vision="frozen", bridge="full", lm="full"),
    "stage2 lora lm": TrainableConfig(vision="frozen", bridge="full", lm="lora"),
    "vision lora only": TrainableConfig(vision="lora", bridge="frozen", lm="frozen"),
    "everything full": TrainableConfig(vision="full", bridge="full", lm="full"),
}


def group_of(name: str) -> str:
    return name.split(".")[0]  # vision_tower | bridge | language_model


@pytest.mark.parametrize("case", list(CASES))
def test_exactly_the_expected_parameters_train(experts, images, case):
    trainable = CASES[case]
    model, proc = build(model_config(experts, bridge="qformer"))
    apply_trainable(model, trainable)
    expect = {"vision_tower": trainable.vision, "bridge": trainable.bridge, "language_model": trainable.lm}

    batch = collate([proc.encode_conversation(CONVERSATION, images[:1])], proc.tokenizer.pad_token_id)
    model(**batch).loss.backward()
    trained_groups = set()
    for name, p in model.named_parameters():
        group = group_of(name)
        mode = expect[group]
        allowed = mode == "full" or (mode == "lora" and "lora_" in name)
        if group == "vision_tower" and allowed and not p.requires_grad:
            # Layers above vision.feature_layer cannot influence the output: frozen on purpose.
            assert ".layers.1." in name or "post_layernorm" in name or "head" in name, name
            allowed = False
        assert p.requires_grad == allowed, name
        assert (p.grad is not None) == allowed, f"{name}: gradient {'missing' if allowed else 'leaked'}"
        if allowed:
            trained_groups.add(group)
    assert trained_groups == {g for g, m in expect.items() if m != "frozen"}


def test_lora_wraps_only_the_requested_part(experts):
    model, _ = build(model_config(experts))
    apply_trainable(model, CASES["stage2 lora lm"])
    assert hasattr(model.language_model, "peft_config")
    assert not hasattr(model.vision_tower.model, "peft_config")
    n_lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    assert n_lora > 0
    assert torch.is_tensor(next(model.language_model.parameters()))


@pytest.mark.parametrize("every", [1, 2, 3])
def test_selective_activation_checkpointing_recomputes_every_kth_layer_and_changes_no_gradient(
    experts, images, every
):
    model, proc = build(model_config(experts, bridge="mlp2x_gelu"))
    apply_trainable(model, CASES["stage2 full lm"])
    model.train()
    batch = collate([proc.encode_conversation(CONVERSATION, images[:1])], proc.tokenizer.pad_token_id)

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    layers = list(model.language_model.get_decoder().layers)
    n = enable_activation_checkpointing(model.language_model, every)
    flags = [layer.gradient_checkpointing for layer in layers]
    assert flags == [i % every == 0 for i in range(len(layers))] and n == sum(flags) == checkpointed_layers(
        len(layers), every
    )
    recomputed = gradients()
    assert recomputed.keys() == plain.keys()
    for name, g in plain.items():
        torch.testing.assert_close(recomputed[name], g, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="checkpoint_every must be at least 1"):
        enable_activation_checkpointing(model.language_model, 0)


@pytest.mark.parametrize("lm", ["qwen2", "llama", "glm4"])
def test_compile_layers_compiles_every_part_of_every_layer_in_place(experts, lm):
    """`train.compile`'s unit: each decoder layer's children (norms, attention, MLP, whatever the
    architecture calls them) compiled in place; the parameters and state_dict keys stay as they were
    (the loop test checks the numbers)."""
    model, _ = build(model_config(experts, lm=lm))
    lm_model = model.language_model
    keys = list(lm_model.state_dict())
    parts = [part for layer in lm_model.get_decoder().layers for part in layer.children()]
    assert compile_layers(lm_model) == len(parts) >= 4 * len(lm_model.get_decoder().layers)
    assert all(part._compiled_call_impl is not None for part in parts)
    assert list(lm_model.state_dict()) == keys
