"""Deep fusion (visual experts) and the superset guarantee: a text-only conversation gives the base
LM's logits bit for bit, for deep fusion and for shallow fusion with a frozen LM, on every tested
LM architecture; image positions do go through the experts; only the experts (and bridge) train."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from seechat.config import TrainableConfig
from seechat.data.collate import collate
from seechat.model import apply_trainable, build, load
from seechat.model.build import DTYPES, add_visual_experts
from seechat.model.checkpoint import write_checkpoint
from seechat.model.export import ExportError, to_llava
from seechat.model.fusion import DEEP_FUSION_LMS
from tests.helpers import CONVERSATION, model_config

ARCHS = ("qwen2", "llama")
TEXT_ONLY = [
    {"role": "system", "content": "你是助手。"},
    {"role": "user", "content": "图里有什么颜色和形状？"},
    {"role": "assistant", "content": "红色的圆形。"},
    {"role": "user", "content": "左右上下是否几个？"},
]


def perturb(module: torch.nn.Module) -> None:
    """Stand-in for training: move every trainable weight."""
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


def base_logits(experts, arch: str, dtype: str, input_ids: torch.Tensor) -> torch.Tensor:
    """The base LM alone, loaded as any user would load it, on the same token ids."""
    lm = AutoModelForCausalLM.from_pretrained(experts["lm"][arch][0], dtype=DTYPES[dtype]).eval()
    with torch.no_grad():
        return lm(input_ids=input_ids).logits


def text_batch(proc) -> dict:
    return collate([proc.encode_conversation(TEXT_ONLY, [])], proc.tokenizer.pad_token_id)


def assert_text_logits_equal_base(model, proc, experts, arch, dtype) -> None:
    batch = text_batch(proc)
    with torch.no_grad():
        got = model(batch["input_ids"], batch["attention_mask"]).logits
    want = base_logits(experts, arch, dtype, batch["input_ids"])
    assert got.dtype == want.dtype == DTYPES[dtype] and got.device == want.device
    # the tokenizer's `<image>` may add an embedding row the base LM lacks: compare the base vocabulary
    assert torch.equal(got[..., : want.shape[-1]], want)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_deep_fusion_text_only_logits_are_the_base_lms_bit_for_bit(experts, images, tmp_path, arch, dtype):
    torch.manual_seed(0)
    model, proc = build(model_config(experts, lm=arch, fusion="deep", dtype=dtype))
    apply_trainable(model, TrainableConfig(lm="frozen", experts="full"))
    perturb(model)  # experts and bridge now differ from the LM's own weights
    model.eval()
    assert_text_logits_equal_base(model, proc, experts, arch, dtype)
    # ... also after save -> load, and the image conversation still reloads identically
    batch = collate([proc.encode_conversation(CONVERSATION, images[:1])], proc.tokenizer.pad_token_id)
    with torch.no_grad():
        before = model(**batch).logits
    write_checkpoint(model, proc, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "visual_experts.safetensors").is_file()
    assert not (tmp_path / "ckpt" / "language_model").exists()  # only the new weights are saved
    loaded, proc2 = load(tmp_path / "ckpt")
    assert loaded.cfg.fusion == "deep"
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, before)
    assert_text_logits_equal_base(loaded, proc2, experts, arch, dtype)


@pytest.mark.parametrize("arch", ARCHS)
def test_shallow_fusion_trained_with_a_frozen_lm_keeps_the_base_lms_text_logits(
    experts, images, tmp_path, arch
):
    torch.manual_seed(0)
    model, proc = build(model_config(experts, lm=arch))
    apply_trainable(model, TrainableConfig(lm="frozen"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    batch = collate([proc.encode_conversation(CONVERSATION, images[:1])], proc.tokenizer.pad_token_id)
    for _ in range(3):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert_text_logits_equal_base(model, proc, experts, arch, "float32")
    write_checkpoint(model, proc, tmp_path / "ckpt")
    loaded, proc2 = load(tmp_path / "ckpt")
    assert_text_logits_equal_base(loaded, proc2, experts, arch, "float32")


def test_image_positions_go_through_the_experts(experts, images):
    """Untrained experts are copies of the LM's layers: deep == shallow. Moving one expert's weights
    changes the logits of an image conversation, and not those of a text-only one."""
    torch.manual_seed(0)
    shallow, proc = build(model_config(experts))
    deep = add_visual_experts(shallow)
    assert deep.cfg.fusion == "deep" and shallow.cfg.fusion == "shallow"
    assert deep.bridge is shallow.bridge and deep.language_model is shallow.language_model
    batch = collate([proc.encode_conversation(CONVERSATION, images[:1])], proc.tokenizer.pad_token_id)
    text = text_batch(proc)
    with torch.no_grad():
        # `shallow` shares the LM, whose hooks act only inside the deep model's routing scope
        torch.testing.assert_close(deep(**batch).logits, shallow(**batch).logits, rtol=0, atol=1e-5)
        text_before = deep(**text).logits
        for name in ("q_proj", "k_proj", "v_proj", "mlp"):
            module = getattr(deep.visual_experts.layers[0], name)
            saved = {k: v.clone() for k, v in module.state_dict().items()}
            for p in module.parameters():
                p.add_(torch.randn_like(p))
            moved = (deep(**batch).logits - shallow(**batch).logits).abs().max()
            assert moved > 1e-3, name  # measured: q 0.003, k 0.03, v 0.5, mlp 0.6 on this tiny model
            assert torch.equal(deep(**text).logits, text_before)
            module.load_state_dict(saved)


def test_deep_fusion_trains_exactly_the_experts_and_the_bridge(experts, images):
    torch.manual_seed(0)
    model, proc = build(model_config(experts, lm="llama", fusion="deep"))
    apply_trainable(model, TrainableConfig(lm="frozen", experts="full"))
    lm_before = {k: v.clone() for k, v in model.language_model.state_dict().items()}
    trains = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trains == {"bridge", "visual_experts"}
    batch = collate([proc.encode_conversation(CONVERSATION, images[:1])], proc.tokenizer.pad_token_id)
    model(**batch).loss.backward()
    layers = model.visual_experts.layers
    assert all(p.grad is not None for p in layers.parameters())
    # the first layer's expert shapes every later position; (the last layer's q and MLP at image
    # positions reach only image positions' logits, which no label reads: zero gradient, as in CogVLM)
    assert all(p.grad.abs().sum() > 0 for p in layers[0].parameters())
    assert all(p.grad is None for p in model.language_model.parameters())
    assert all(torch.equal(v, lm_before[k]) for k, v in model.language_model.state_dict().items())
    apply_trainable(model, TrainableConfig(lm="frozen", experts="frozen"))
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"bridge"}


@pytest.mark.parametrize("lm", ["full", "lora"])
def test_deep_fusion_refuses_to_train_the_lm(experts, lm):
    model, _ = build(model_config(experts, fusion="deep"))
    with pytest.raises(ValueError, match="keeps the language model frozen"):
        apply_trainable(model, TrainableConfig(lm=lm))


def test_deep_fusion_registry_is_explicit(experts):
    assert set(DEEP_FUSION_LMS) == {"qwen2", "llama"}
    with pytest.raises(ValueError, match="supports the LM families qwen2, llama; this LM is 'glm4'"):
        build(model_config(experts, lm="glm4", fusion="deep"))


def test_llava_export_refuses_deep_fusion(experts):
    model, proc = build(model_config(experts, fusion="deep"))
    with pytest.raises(ExportError, match="deep-fusion"):
        to_llava(model, proc.stop_token_ids, proc.tokenizer.pad_token_id)
