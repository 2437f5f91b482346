"""Padding-free batches: the same samples give the same loss and gradients as the padded batch, on
every LM architecture, with deep fusion and activation checkpointing, on CPU and (when present) on
a GPU's FlashAttention varlen kernel; the switched LM still serves padded batches and generation."""

from __future__ import annotations

import inspect

import pytest
import torch

from seechat.data.collate import collate, collate_padding_free
from seechat.infer.generate import generate
from seechat.infer.sampling import SamplingParams
from seechat.model import build, varlen
from seechat.model.build import enable_activation_checkpointing
from seechat.model.tiny import LM_ARCHS
from seechat.model.varlen import VARLEN_ATTENTION, use_varlen_attention
from seechat.train.averaging import label_weights, weighted_count
from seechat.train.loop import batch_loss
from tests.helpers import CONVERSATION, model_config

IGNORE = -100


def _samples(proc, images):
    """Three conversations of different lengths, two with an image, one text-only."""
    short = [{"role": "user", "content": "<image>\n颜色？"}, {"role": "assistant", "content": "蓝。"}]
    text = [
        {"role": "user", "content": "你好，请介绍一下你自己。"},
        {"role": "assistant", "content": "我是助手，看图说话。"},
    ]
    return [
        proc.encode_conversation(CONVERSATION, images[:1]),
        proc.encode_conversation(short, images[1:2]),
        proc.encode_conversation(text, []),
    ]


def _loss_and_grads(model, batch, average="token"):
    model.zero_grad(set_to_none=True)
    out = batch_loss(model, batch, average)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


def _assert_same(padded, free):
    (loss_a, grads_a), (loss_b, grads_b) = padded, free
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_collate_padding_free_lays_samples_end_to_end(experts, images):
    _, proc = build(model_config(experts))
    samples = _samples(proc, images)
    batch = collate_padding_free(samples)
    lengths = [s.input_ids.shape[0] for s in samples]
    assert batch["input_ids"].shape == (1, sum(lengths))
    assert batch["cu_seq_lens"].tolist() == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    assert batch["cu_seq_lens"].dtype == torch.int32 and batch["max_seq_len"] == max(lengths)
    starts = batch["cu_seq_lens"][:-1].long()
    assert (batch["position_ids"][0, starts] == 0).all()
    assert batch["position_ids"][0, -1] == lengths[-1] - 1
    assert (batch["labels"][0, starts] == IGNORE).all()  # no target crosses a boundary
    assert "attention_mask" not in batch
    assert batch["pixel_values"].shape[0] == 2


def test_label_weights_are_per_conversation_in_either_layout(experts, images):
    _, proc = build(model_config(experts))
    samples = _samples(proc, images)
    padded = collate(samples, proc.tokenizer.pad_token_id)
    free = collate_padding_free(samples)
    for average in ("token", "sample", "square"):
        assert weighted_count(free["labels"], average, free["cu_seq_lens"]) == pytest.approx(
            weighted_count(padded["labels"], average)
        )
    w_pad = label_weights(padded["labels"], "sample")
    w_free = label_weights(free["labels"], "sample", free["cu_seq_lens"])
    for i, s in enumerate(samples):
        n = s.input_ids.shape[0]
        a, b = free["cu_seq_lens"][i], free["cu_seq_lens"][i + 1]
        torch.testing.assert_close(w_free[0, a:b], w_pad[i, :n])


@pytest.mark.parametrize("lm", LM_ARCHS)
def test_padding_free_gives_the_padded_loss_and_gradients(experts, images, lm):
    torch.manual_seed(0)
    model, proc = build(model_config(experts, lm=lm))
    samples = _samples(proc, images)
    padded = _loss_and_grads(model, collate(samples, proc.tokenizer.pad_token_id), "sample")
    assert use_varlen_attention(model.language_model) == VARLEN_ATTENTION
    free = _loss_and_grads(model, collate_padding_free(samples), "sample")
    _assert_same(padded, free)


def test_padding_free_with_deep_fusion_and_checkpointing(experts, images):
    torch.manual_seed(0)
    model, proc = build(model_config(experts, fusion="deep"))
    model.train()
    samples = _samples(proc, images)
    padded = _loss_and_grads(model, collate(samples, proc.tokenizer.pad_token_id))
    use_varlen_attention(model.language_model)
    _assert_same(padded, _loss_and_grads(model, collate_padding_free(samples)))

    plain, proc = build(model_config(experts))
    plain.train()
    padded = _loss_and_grads(plain, collate(samples, proc.tokenizer.pad_token_id))
    use_varlen_attention(plain.language_model)
    enable_activation_checkpointing(plain.language_model, every=2)
    _assert_same(padded, _loss_and_grads(plain, collate_padding_free(samples)))


def test_switched_lm_still_serves_padded_batches_and_generation(experts, images):
    torch.manual_seed(0)
    model, proc = build(model_config(experts))
    model.eval()
    samples = _samples(proc, images)
    batch = collate(samples, proc.tokenizer.pad_token_id)
    prompt = collate([proc.encode_prompt(CONVERSATION[:2], images[:1])], proc.tokenizer.pad_token_id, "left")
    params = SamplingParams(max_new_tokens=6)
    args = (prompt["input_ids"], prompt["attention_mask"], prompt["pixel_values"], params)
    with torch.no_grad():
        logits = model(**batch).logits
        tokens = generate(model, *args)
        use_varlen_attention(model.language_model)
        torch.testing.assert_close(model(**batch).logits, logits, rtol=1e-5, atol=1e-5)
        again = generate(model, *args)
    assert again == tokens


def test_padding_free_batch_must_be_one_row_with_positions(experts, images):
    model, proc = build(model_config(experts))
    batch = collate_padding_free(_samples(proc, images))
    with pytest.raises(ValueError, match="one row with position_ids and no attention_mask"):
        model(**{**batch, "position_ids": None})


def test_plain_sdpa_is_also_correct_and_varlen_skips_its_mask(experts, images, monkeypatch):
    """transformers reads the restarting position ids as a block-diagonal (N, N) mask, so an LM left
    on `sdpa` computes the same loss; after the switch the varlen path runs and that mask is not built."""
    torch.manual_seed(0)
    model, proc = build(model_config(experts))
    samples = _samples(proc, images)
    padded = model(**collate(samples, proc.tokenizer.pad_token_id), return_logits=False).loss
    masks, calls = [], []
    real_mask, real_attention = varlen.sdpa_mask, varlen._padded_causal
    monkeypatch.setattr(varlen, "sdpa_mask", lambda *a, **k: masks.append(1) or real_mask(*a, **k))
    monkeypatch.setattr(varlen, "_padded_causal", lambda *a, **k: calls.append(1) or real_attention(*a, **k))
    on_sdpa = model(**collate_padding_free(samples), return_logits=False).loss
    torch.testing.assert_close(on_sdpa, padded)
    use_varlen_attention(model.language_model)
    on_varlen = model(**collate_padding_free(samples), return_logits=False).loss
    torch.testing.assert_close(on_varlen, padded)
    n_layers = model.language_model.config.num_hidden_layers
    assert len(calls) == n_layers and not masks


def test_which_attentions_switch(experts):
    model, _ = build(model_config(experts, attn_implementation="eager"))
    assert use_varlen_attention(model.language_model) == VARLEN_ATTENTION  # eager switches too
    assert use_varlen_attention(model.language_model) == VARLEN_ATTENTION  # and again: idempotent


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flash_varlen_on_cuda_gives_the_padded_loss_and_gradients(experts, images, monkeypatch):
    """On a GPU in bf16 the padding-free row runs through torch's FlashAttention varlen kernel (when
    this torch has it) and matches the padded batch to bf16 precision."""
    torch.manual_seed(0)
    model, proc = build(model_config(experts, dtype="bfloat16"))
    model.cuda().train()
    samples = _samples(proc, images)

    def on_gpu(batch):
        return {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}

    loss_a, grads_a = _loss_and_grads(model, on_gpu(collate(samples, proc.tokenizer.pad_token_id)))
    calls = []
    real = varlen._flash_varlen
    monkeypatch.setattr(varlen, "_flash_varlen", lambda *a, **k: calls.append(1) or real(*a, **k))
    use_varlen_attention(model.language_model)
    loss_b, grads_b = _loss_and_grads(model, on_gpu(collate_padding_free(samples)))
    if varlen._torch_varlen_attn() is not None and varlen._flash_capable(torch.cuda.current_device()):
        assert calls, "the flash varlen kernel was not used"
    torch.testing.assert_close(loss_b.float(), loss_a.float(), rtol=2e-2, atol=2e-2)
    for name in grads_a:
        a, b = grads_a[name].float(), grads_b[name].float()
        assert torch.linalg.vector_norm(a - b) <= 0.05 * torch.linalg.vector_norm(a) + 1e-3, name


def test_an_lm_with_sliding_window_layers_keeps_its_attention(experts):
    """VARLEN_ATTENTION has no sliding window: such an LM stays on transformers' own attention, whose
    block-diagonal mask is correct for a padding-free row (only slower)."""
    model, _ = build(model_config(experts))
    model.language_model.config.layer_types = ["sliding_attention", "full_attention"]
    assert use_varlen_attention(model.language_model) == "sdpa"


def test_switched_lm_continues_a_kv_cache_in_chunks_as_sdpa_does(experts):
    """Without a mask, a chunk that continues a KV cache needs a causal mask offset by the cache
    (SDPA's `is_causal` would align it top-left): the switched LM still gets it."""
    torch.manual_seed(0)
    model, _ = build(model_config(experts))
    lm = model.language_model.eval()
    ids = torch.randint(10, lm.config.vocab_size, (1, 12))
    with torch.no_grad():
        whole = lm(input_ids=ids).logits
        use_varlen_attention(lm)
        first = lm(input_ids=ids[:, :5], use_cache=True)
        rest = lm(input_ids=ids[:, 5:], cache=first.cache).logits
    torch.testing.assert_close(rest, whole[:, 5:], rtol=1e-5, atol=1e-5)


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, window_size=None, is_causal=None, **kw):
    """A per-sequence SDPA with torch varlen_attn's calling convention ((N, H, D) in and out)."""
    assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and max_q == max_k
    assert window_size == (-1, 0) or is_causal is True  # causal, in either spelling
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    outs = []
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
        o = torch.nn.functional.scaled_dot_product_attention(
            q[s:e].transpose(0, 1),
            k[s:e].transpose(0, 1),
            v[s:e].transpose(0, 1),
            is_causal=True,
            scale=scale,
            enable_gqa=kw.get("enable_gqa", False),
        )
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


def _torch_2_10_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False):
    return _reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=is_causal)


def _torch_2_13_varlen(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False
):
    return _reference_varlen(
        query,
        key,
        value,
        cu_seq_q,
        cu_seq_k,
        max_q,
        max_k,
        scale=scale,
        window_size=window_size,
        enable_gqa=enable_gqa,
    )


@pytest.mark.parametrize("kernel", [_torch_2_10_varlen, _torch_2_13_varlen])
def test_the_flash_varlen_call_is_wired_as_each_torch_spells_it(kernel, monkeypatch):
    """The CUDA path's call into torch's varlen_attn, checked on the CPU against a stand-in with the
    same signature: torch 2.10's `is_causal` (no scale, no GQA: key/value heads repeated) and later
    versions' `window_size`, `scale` and `enable_gqa`. The result must be the padded path's."""
    torch.manual_seed(0)
    monkeypatch.setattr(varlen, "_torch_varlen_attn", lambda: (kernel, inspect.signature(kernel).parameters))
    lengths = [5, 2, 7]
    cu = torch.tensor([0, 5, 7, 14], dtype=torch.int32)
    q, k, v = torch.randn(1, 4, 14, 8), torch.randn(1, 2, 14, 8), torch.randn(1, 2, 14, 8)
    expected = varlen._padded_causal(q, k, v, cu, max(lengths), 8**-0.5, 0.0)
    torch.testing.assert_close(varlen._flash_varlen(q, k, v, cu, max(lengths), 8**-0.5), expected)
