"""Every vision arch x bridge x LM arch builds, computes a loss and generates; merging is checked."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from seechat.config import BridgeConfig
from seechat.data.collate import collate
from seechat.infer.generate import generate, generate_without_cache
from seechat.infer.sampling import SamplingParams
from seechat.model import BRIDGES, build
from seechat.model.bridges import build_bridge, merge_patches, merged_grid
from seechat.model.tiny import LM_ARCHS, VISION_ARCHS
from tests.helpers import CONVERSATION, model_config


@pytest.mark.parametrize("lm", LM_ARCHS)
@pytest.mark.parametrize("bridge", list(BRIDGES))
@pytest.mark.parametrize("vision", VISION_ARCHS)
def test_every_combination_trains_and_generates(experts, images, vision, bridge, lm):
    torch.manual_seed(0)
    model, proc = build(model_config(experts, vision, lm, bridge))
    enc = proc.encode_conversation(CONVERSATION, images[:1])
    batch = collate([enc, enc], proc.tokenizer.pad_token_id)
    out = model(**batch)
    assert out.loss is not None and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.bridge.parameters().__next__().grad is not None
    expected_tokens = {"linear": 16, "mlp2x_gelu": 16, "qformer": 4, "resampler": 4}[bridge]
    assert model.num_image_tokens == expected_tokens
    assert int((batch["input_ids"] == model.image_token_id).sum()) == 2 * expected_tokens

    prompt = collate([proc.encode_prompt(CONVERSATION[:2], images[:1])], proc.tokenizer.pad_token_id, "left")
    new = generate(
        model,
        prompt["input_ids"],
        prompt["attention_mask"],
        prompt["pixel_values"],
        SamplingParams(max_new_tokens=4),
    )
    assert len(new) == 1 and 1 <= len(new[0]) <= 4


def test_count_mismatch_names_both_counts(experts, images):
    model, proc = build(model_config(experts))
    enc = proc.encode_conversation(CONVERSATION, images[:1])
    batch = collate([enc], proc.tokenizer.pad_token_id)
    extra = torch.cat([batch["pixel_values"], batch["pixel_values"]])
    with pytest.raises(ValueError, match=r"text has 16 image tokens but the images give 32 features"):
        model(batch["input_ids"], batch["attention_mask"], pixel_values=extra)


def test_marker_image_count_mismatch_is_clear(experts, images):
    _, proc = build(model_config(experts))
    with pytest.raises(ValueError, match="1 <image> marker\\(s\\) but 2 image\\(s\\)"):
        proc.encode_conversation(CONVERSATION, images[:2])


def test_several_images_scatter_in_order(experts, images):
    model, proc = build(model_config(experts, bridge="linear"))
    conv = [
        {"role": "user", "content": "<image>\n<image>\n比较两张图。"},
        {"role": "assistant", "content": "左红右蓝。"},
    ]
    enc = proc.encode_conversation(conv, images[:2])
    assert enc.pixel_values.shape[0] == 2
    batch = collate([enc], proc.tokenizer.pad_token_id)
    feats = model.encode_images(batch["pixel_values"])  # (2, N, D)
    embeds = model.embed(batch["input_ids"], feats)
    slots = (batch["input_ids"][0] == model.image_token_id).nonzero().squeeze(1)
    n = model.num_image_tokens
    torch.testing.assert_close(embeds[0, slots[:n]], feats[0])
    torch.testing.assert_close(embeds[0, slots[n:]], feats[1])


def test_kv_cached_greedy_equals_full_recompute(experts, images):
    torch.manual_seed(0)
    model, proc = build(model_config(experts, lm="llama", bridge="qformer"))
    model.eval()
    enc = proc.encode_prompt(CONVERSATION[:2], images[:1])
    ids = enc.input_ids[None]
    cached = generate(model, ids, None, enc.pixel_values, SamplingParams(max_new_tokens=12))[0]
    reference = generate_without_cache(model, ids, enc.pixel_values, max_new_tokens=12)
    assert cached == reference[: len(cached)] and len(cached) == 12


def test_left_padded_batch_matches_single(experts, images):
    torch.manual_seed(0)
    model, proc = build(model_config(experts))
    model.eval()
    short = proc.encode_prompt([{"role": "user", "content": "<image>\n你好"}], images[:1])
    long = proc.encode_prompt(CONVERSATION[:2], images[1:2])
    batch = collate([short, long], proc.tokenizer.pad_token_id, "left")
    together = generate(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        batch["pixel_values"],
        SamplingParams(max_new_tokens=6),
    )
    alone = [
        generate(model, e.input_ids[None], None, e.pixel_values, SamplingParams(max_new_tokens=6))[0]
        for e in (short, long)
    ]
    assert together == alone


@pytest.mark.parametrize("lm", LM_ARCHS)
def test_loss_only_forward_equals_full_logits_loss(experts, images, lm):
    """Training's `return_logits=False` runs the LM head only where a supervised token is predicted:
    the loss and every gradient equal those of the full-logits forward."""
    torch.manual_seed(0)
    model, proc = build(model_config(experts, "clip", lm, "mlp2x_gelu"))
    short = [*CONVERSATION[:2], {"role": "assistant", "content": "好"}]
    encs = [proc.encode_conversation(CONVERSATION, images[:1]), proc.encode_conversation(short, images[1:2])]
    batch = collate(encs, proc.tokenizer.pad_token_id)
    grads = []
    for return_logits in (True, False):
        model.zero_grad()
        out = model(**batch, num_items_in_batch=7, return_logits=return_logits)
        out.loss.backward()
        grads.append((out.loss.detach(), out.num_items, [p.grad.clone() for p in model.bridge.parameters()]))
        assert (out.logits is None) == (not return_logits)
    (full, n_full, g_full), (kept, n_kept, g_kept) = grads
    torch.testing.assert_close(kept, full, rtol=1e-6, atol=1e-6)
    assert n_kept == n_full
    for a, b in zip(g_full, g_kept, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_patch_merge_concatenates_each_block_of_neighbours_and_quarters_the_tokens(experts, images):
    """bridge.merge=2: a 4x4 patch grid becomes 2x2 tokens, token k built from exactly its block."""
    x = torch.arange(16.0).view(1, 16, 1)
    assert merge_patches(x, 2).squeeze(0).tolist() == [
        [0, 1, 4, 5],
        [2, 3, 6, 7],
        [8, 9, 12, 13],
        [10, 11, 14, 15],
    ]
    cfg = model_config(experts, bridge="mlp2x_gelu")
    model, proc = build(replace(cfg, bridge=replace(cfg.bridge, merge=2)))
    assert model.num_image_tokens == 4 and proc.num_image_tokens == 4
    enc = proc.encode_prompt([{"role": "user", "content": "<image>\n图里有什么？"}], images[:1])
    assert int((enc.input_ids == model.image_token_id).sum()) == 4
    model(enc.input_ids[None], pixel_values=enc.pixel_values)  # the counts match in the merge


def test_patch_merge_refuses_grids_it_cannot_tile_and_query_bridges():
    with pytest.raises(ValueError, match="multiple of it"):
        merged_grid(16, 3)
    with pytest.raises(ValueError, match="num_queries"):
        build_bridge(BridgeConfig(type="qformer", merge=2), 8, 8, 16)
