"""The fused LM-head loss gives the plain path's loss and gradients (every parameter, weighted
tokens, padding-free batches, deep fusion, several chunks, mixed precision), and steps aside where
the LM's logits are more than its head or the head is not a plain linear layer."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from seechat.data.collate import collate, collate_padding_free
from seechat.model import build, fused_loss
from seechat.model.fused_loss import fused_head, head_cross_entropy
from seechat.model.modeling import token_loss
from seechat.model.tiny import LM_ARCHS
from seechat.model.varlen import use_varlen_attention
from seechat.train.loop import batch_loss
from tests.helpers import CONVERSATION, model_config

IGNORE = -100


def _plain(hidden, head, targets, weights):
    """The plain path: the head's logits, then seechat's token loss, summed (divided by 1)."""
    return token_loss(head(hidden)[None], targets[None], 1, weights[None])[0]


def _head_case(dtype=torch.float32, bias=True, k=37, h=16, v=50):
    torch.manual_seed(0)
    head = nn.Linear(h, v, bias=bias).to(dtype)
    hidden = torch.randn(k, h, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, v, (k,))
    targets[::5] = IGNORE
    weights = torch.rand(k) * (targets != IGNORE)
    return hidden, head, targets, weights


def _value_and_grads(loss_fn, hidden, head, targets, weights, scale=0.3):
    hidden.grad, head.weight.grad = None, None
    if head.bias is not None:
        head.bias.grad = None
    loss = loss_fn(hidden, head, targets, weights)
    (loss * scale).backward()  # a factor after the sum, as the loss's divisor is
    params = [hidden, head.weight] + ([head.bias] if head.bias is not None else [])
    return loss.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("chunk_tokens", [1, 4, 1000])
@pytest.mark.parametrize("bias", [True, False])
def test_head_loss_equals_plain_cross_entropy(monkeypatch, chunk_tokens, bias):
    """In float32 the value and the gradients of hidden, weight and bias match the plain path's,
    however the tokens are cut into chunks (1 token, a few, all at once)."""
    hidden, head, targets, weights = _head_case(bias=bias)
    monkeypatch.setattr(fused_loss, "CHUNK_ELEMENTS", chunk_tokens * head.weight.shape[0])
    want, want_grads = _value_and_grads(_plain, hidden, head, targets, weights)
    got, got_grads = _value_and_grads(head_cross_entropy, hidden, head, targets, weights)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("head_dtype", "autocast"), [(torch.bfloat16, False), (torch.float32, True)], ids=["bf16", "autocast"]
)
def test_head_loss_in_bf16_and_under_autocast(monkeypatch, head_dtype, autocast):
    """A bf16 head gives bf16 gradients, a float32 head under bf16 autocast float32 ones, each close to
    the plain path's in the same precision."""
    monkeypatch.setattr(fused_loss, "CHUNK_ELEMENTS", 8 * 50)
    hidden, head, targets, weights = _head_case(head_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        want, want_grads = _value_and_grads(_plain, hidden, head, targets, weights)
        got, got_grads = _value_and_grads(head_cross_entropy, hidden, head, targets, weights)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-2)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert a.dtype == head_dtype
        torch.testing.assert_close(a, b, rtol=5e-2, atol=1e-2)


def test_head_loss_without_grad_is_the_same_value_and_a_second_backward_is_refused():
    hidden, head, targets, weights = _head_case()
    with torch.no_grad():
        alone = head_cross_entropy(hidden, head, targets, weights)
    loss = head_cross_entropy(hidden, head, targets, weights)
    assert not alone.requires_grad
    torch.testing.assert_close(alone, loss.detach())
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="fused_loss=false"):
        loss.backward()


def _samples(proc, images):
    short = [{"role": "user", "content": "<image>\n颜色？"}, {"role": "assistant", "content": "蓝。"}]
    return [proc.encode_conversation(CONVERSATION, images[:1]), proc.encode_conversation(short, images[1:2])]


def _loss_and_grads(model, batch, average):
    model.zero_grad(set_to_none=True)
    out = batch_loss(model, batch, average)
    assert out.logits is None
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.num_items, grads


def _assert_fused_equals_plain(model, batch, average):
    """The loss, the supervised count and every parameter's gradient, plain then fused."""
    model.fused_loss = False
    want = _loss_and_grads(model, batch, average)
    model.fused_loss = True
    got = _loss_and_grads(model, batch, average)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    assert got[1] == want[1]
    assert got[2].keys() == want[2].keys()
    for name, grad in want[2].items():
        torch.testing.assert_close(got[2][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("lm", LM_ARCHS)
def test_model_loss_and_every_gradient_equal_the_plain_path(experts, images, lm):
    """Every parameter trains (LM, head, embeddings, bridge, vision); per-sample weighted tokens; a
    padded and a padding-free batch: fused and plain agree on the loss, the count and each gradient."""
    torch.manual_seed(0)
    model, proc = build(model_config(experts, lm=lm))
    assert fused_head(model.language_model) is model.language_model.get_output_embeddings()
    for p in model.parameters():
        p.requires_grad_(True)
    samples = _samples(proc, images)
    padded = collate(samples, proc.tokenizer.pad_token_id)
    for batch in (padded, "padding-free"):
        if batch == "padding-free":
            use_varlen_attention(model.language_model)
            batch = collate_padding_free(samples)
        _assert_fused_equals_plain(model, batch, "sample")


def test_deep_fusion_loss_equals_the_plain_path(experts, images):
    torch.manual_seed(0)
    model, proc = build(model_config(experts, fusion="deep"))
    batch = collate(_samples(proc, images), proc.tokenizer.pad_token_id)
    _assert_fused_equals_plain(model, batch, "token")


def test_heads_that_are_more_than_a_linear_layer_keep_the_plain_path(experts, monkeypatch):
    """A LoRA'd head, or an LM type outside the registry (whose logits may be scaled or capped)."""
    model, _ = build(model_config(experts))
    assert model.loss_head() is not None
    model.fused_loss = False
    assert model.loss_head() is None
    model.fused_loss = True
    monkeypatch.setattr(fused_loss, "FUSED_HEAD_LMS", frozenset({"cohere"}))
    assert fused_head(model.language_model) is None
    monkeypatch.undo()
    lora = get_peft_model(model.language_model, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert fused_head(lora) is None
    plain_lora, _ = build(model_config(experts))
    lora = get_peft_model(plain_lora.language_model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert fused_head(lora) is lora.get_output_embeddings()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_head_loss_is_close_to_the_plain_path_and_holds_less(monkeypatch):
    """On a GPU in bf16, at a vocabulary large enough to chunk: the value and gradients are the plain
    path's to bf16 rounding, and the step's peak memory is below the plain path's."""
    torch.manual_seed(0)
    k, h, v = 2048, 256, 32000
    monkeypatch.setattr(fused_loss, "CHUNK_ELEMENTS", 256 * v)  # 8 chunks
    head = nn.Linear(h, v, bias=False, device="cuda", dtype=torch.bfloat16)
    hidden = torch.randn(k, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, v, (k,), device="cuda")
    targets[::7] = IGNORE
    weights = (targets != IGNORE).float()
    results, peaks = [], []
    for fn in (_plain, head_cross_entropy):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        results.append(_value_and_grads(fn, hidden, head, targets, weights))
        peaks.append(torch.cuda.max_memory_allocated() - base)
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=2e-3)
    assert peaks[1] < peaks[0]
