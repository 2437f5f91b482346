"""`seechat estimate`: the activation formula equals what autograd saves, the memory arithmetic
equals a hand computation, the bridge is measured right, and the verb runs end to end.
(Parameter formulas: tests/model/test_sizes.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from seechat.config import load_config
from seechat.estimate import (
    DS_REDUCE_BUCKET,
    ParamMemory,
    Setup,
    bridge_profile,
    estimate,
    lm_layer_activation_bytes,
    parameter_memory,
)
from seechat.mini.demo import RECIPES
from seechat.model.fused_loss import chunk_tokens
from seechat.model.sizes import expert_config, lm_shape, vision_shape
from tests.conftest import tiny_overrides

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _saved_bytes(layers: int, config: Qwen2Config, dtype: torch.dtype, learns: bool, tokens: int) -> int:
    """Bytes of the distinct tensors autograd saves in one forward, weights and input excluded."""
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype).train()
    model.requires_grad_(learns)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    embeds = torch.randn(1, tokens, config.hidden_size, dtype=dtype, requires_grad=True)
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights and ptr != embeds.untyped_storage().data_ptr():
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(inputs_embeds=embeds)
    return sum(saved.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("learns", [True, False], ids=["lm-learns", "lm-frozen"])
def test_layer_activation_formula_equals_what_autograd_saves(dtype, learns):
    config = Qwen2Config(
        vocab_size=50,
        hidden_size=64,
        intermediate_size=160,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    tokens = 96
    # one layer more, the same everything else: the difference is exactly one decoder layer
    per_token = (
        _saved_bytes(2, config, dtype, learns, tokens) - _saved_bytes(1, config, dtype, learns, tokens)
    ) / tokens
    act_bytes = 4 if dtype == torch.float32 else 2
    assert per_token == lm_layer_activation_bytes(lm_shape(config), act_bytes, learns)


def test_parameter_memory_matches_a_hand_computation():
    # 1000 B of weights; 100 trainable params = 200 B (bf16); units: a layer 50 B, the root 300 B
    m = ParamMemory(weights=1000, trainable=200, n_trainable=100, layer=50, root=300, largest_module=120)

    def lines(strategy):
        return {line.name: line.bytes for line in parameter_memory(m, strategy, gpus=4)}

    assert lines("ddp") == {"weights": 1000, "gradients": 2 * 200, "optimizer": 2 * 200}
    assert lines("fsdp") == {"weights": 1000 / 4 + 300 + 2 * 50, "gradients": 200 / 4, "optimizer": 400 / 4}
    bucket = min(DS_REDUCE_BUCKET, 100) * 2
    assert lines("zero2") == {"weights": 1000, "gradients": 200 / 4 + bucket, "optimizer": 12 * 100 / 4}
    assert lines("zero3") == {"weights": 1000 / 4 + 2 * 120, "gradients": 200 / 4 + bucket, "optimizer": 300}
    with pytest.raises(ValueError, match="ddp, fsdp, zero2, zero3"):
        parameter_memory(m, "zero1", 4)


def test_bridge_profile_on_the_meta_device_matches_the_real_bridge():
    cfg = load_config(CONFIGS / "reference" / "stage1_mlp_qwen2.5-7b.yaml")
    vision, lm = (
        vision_shape(expert_config(cfg.model.vision.path)),
        lm_shape(expert_config(cfg.model.lm.path)),
    )
    p = bridge_profile(cfg, vision, lm)
    assert p.num_tokens == 576 and p.params == (1024 * 3584 + 3584) + (3584 * 3584 + 3584)
    # mlp2x_gelu keeps its input, the GELU input and the GELU output: (1024 + 2 x 3584) x 576 x bf16
    assert p.saved_bytes_per_image == (1024 + 2 * 3584) * 576 * 2


def test_estimate_of_tiny_local_experts_counts_the_built_model(tiny_world, tmp_path):
    from seechat.model.build import build

    cfg = load_config(
        CONFIGS.parent / "seechat" / "mini" / "recipes" / "stage2.yaml",
        tiny_overrides(tiny_world, tmp_path, **{"model.bridge.type": "qformer"}),
    )
    e = estimate(cfg, Setup(gpus=2, strategy="fsdp"))
    model, _ = build(cfg.model)
    counts = {part: n for part, _, n, _, _ in e.parts}
    assert counts["vision"] == numel(model.vision_tower)
    assert counts["bridge"] == numel(model.bridge)
    assert counts["lm"] == numel(model.language_model)
    assert all(source == "local config.json" for part, *_, source in e.parts if part != "bridge")


def test_deep_fusion_counts_the_built_experts_and_what_they_add(tiny_world, tmp_path):
    from seechat.model.build import build

    over = tiny_overrides(
        tiny_world,
        tmp_path,
        **{"model.fusion": "deep", "trainable.lm": "frozen", "train.gradient_checkpointing": False},
    )
    deep_cfg = load_config(RECIPES / "stage2.yaml", over)
    shallow_cfg = load_config(RECIPES / "stage2.yaml", [*over, "model.fusion=shallow"])
    deep, shallow = (estimate(c, Setup(gpus=1, strategy="ddp")) for c in (deep_cfg, shallow_cfg))
    model, _ = build(deep_cfg.model)
    counts = {part: n for part, _, n, _, _ in deep.parts}
    assert counts["experts"] == numel(model.visual_experts)
    memory = {line.name: line.bytes for line in deep.memory}
    plain = {line.name: line.bytes for line in shallow.memory}
    assert memory["optimizer"] - plain["optimizer"] == 2 * 4 * counts["experts"]  # fp32 AdamW moments
    assert memory["activations"] > plain["activations"] and "experts" in deep.flops_per_sample
    assert "experts" not in {part for part, *_ in shallow.parts}


def test_selective_checkpointing_trades_activation_memory_for_recompute():
    """train.checkpoint_every=k recomputes ceil(L/k) of the L layers: activations grow and the
    recomputed FLOPs shrink with k, between full checkpointing (k=1) and none."""
    recipe = CONFIGS / "reference" / "stage2_mlp_qwen2.5-7b.yaml"
    runs = {
        k: estimate(
            load_config(recipe, ["train.gradient_checkpointing=true", f"train.checkpoint_every={k}"]), Setup()
        )
        for k in (1, 2, 4, 28)
    }
    off = estimate(load_config(recipe, ["train.gradient_checkpointing=false"]), Setup())
    acts = {k: {line.name: line for line in e.memory}["activations"] for k, e in runs.items()}
    flops = {k: e.flops_per_sample["lm"] for k, e in runs.items()}
    off_acts = {line.name: line for line in off.memory}["activations"].bytes
    assert acts[1].bytes < acts[2].bytes < acts[4].bytes < acts[28].bytes < off_acts
    assert flops[1] > flops[2] > flops[4] > flops[28] > off.flops_per_sample["lm"]
    assert "on for 14 of 28 layers (every 2)" in acts[2].note and "checkpointing on (" in acts[1].note


@pytest.mark.parametrize("lm_mode", ["full", "frozen"])
def test_fused_loss_replaces_the_logits_term_with_one_chunk_and_the_head_gradient(lm_mode):
    """train.fused_loss: the head's term is one chunk of logits (product dtype + float32) and, when the
    head learns, its gradient; with fusing off, ~14 bytes per text position x vocabulary. The rest of
    the activations is the same either way."""
    recipe = CONFIGS / "reference" / "stage2_mlp_qwen2.5-7b.yaml"
    base = ["train.gradient_checkpointing=false", f"trainable.lm={lm_mode}"]
    acts = {
        fused: {
            line.name: line
            for line in estimate(load_config(recipe, [*base, f"train.fused_loss={fused}"]), Setup()).memory
        }["activations"].bytes
        for fused in ("true", "false")
    }
    cfg = load_config(recipe, base)
    lm = lm_shape(expert_config(cfg.model.lm.path))
    image_tokens = 576  # mlp2x_gelu on ViT-L/14-336
    text = cfg.train.batch_size * (cfg.model.max_length - image_tokens)
    plain_head = text * lm.vocab * (2 + 12)
    fused_head = chunk_tokens(lm.vocab) * lm.vocab * (2 + 4) + (
        lm.vocab * lm.hidden * 2 if lm_mode == "full" else 0
    )
    assert acts["false"] - acts["true"] == pytest.approx(plain_head - fused_head, rel=1e-9)
