"""The runner's decode paths give the logits of a full transformers forward, with holes and joins."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, Qwen2Config

from seechat.infer.chat import prompt_ids
from seechat.infer.kv import BatchKV, SlotKV
from seechat.infer.ops import rms_norm, rope, signed_sin
from seechat.infer.runner import FAST_DECODERS, LlamaStyleDecoder, ModelRunner, PrefillRow
from seechat.infer.static_decode import StaticDecoder, _fused_rms, fuse_projections
from seechat.model import load
from tests.infer.tiny_engine import coloured, write_tiny_checkpoint

QUESTIONS = ["你好", "图里有什么？请描述", "是什么颜色", "左右上下是否几个颜色形状位置"]


def _rows(model, processor, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    ids, feats = [], []
    for i in range(n):
        with_image = i % 3 != 2
        text = ("<image>\n" if with_image else "") + QUESTIONS[i % 4] * (1 + i % 2)
        ids.append(prompt_ids(processor, [{"role": "user", "content": text}], int(with_image)))
        feats.append(
            model.encode_images(processor.preprocess_images([coloured(i)]))[0] if with_image else None
        )
    return ids, feats


def _reference(model, ids: torch.Tensor, feats, new: list[int]) -> torch.Tensor:
    """Logits of the last position of a full forward over prompt + new tokens."""
    full = torch.cat([ids, torch.tensor(new, dtype=torch.long)])[None]
    return model(full, image_features=None if feats is None else feats[None]).logits[0, -1]


@pytest.mark.parametrize("fixture", ["tiny", "tiny_glm"])
@torch.inference_mode()
def test_prefill_join_decode_matches_full_forward(fixture, request):
    model, processor = request.getfixturevalue(fixture)
    runner = ModelRunner(model, processor.tokenizer.pad_token_id)
    assert runner.decode_path == ("fast" if fixture == "tiny" else "transformers")
    ids, feats = _rows(model, processor, 5)
    logits, kv = runner.prefill([PrefillRow(i, None, f) for i, f in zip(ids[:3], feats[:3], strict=True)])
    new = [[int(t)] for t in logits.argmax(-1)]
    for step in range(3):
        if step == 1:  # two more sequences join a running batch with different lengths
            more_logits, more = runner.prefill(
                [PrefillRow(i, None, f) for i, f in zip(ids[3:], feats[3:], strict=True)]
            )
            kv.merge(more)
            new += [[int(t)] for t in more_logits.argmax(-1)]
        if step == 2:  # one leaves
            kv.select([0, 2, 3, 4])
            ids, feats, new = (
                [ids[i] for i in (0, 2, 3, 4)],
                [feats[i] for i in (0, 2, 3, 4)],
                [new[i] for i in (0, 2, 3, 4)],
            )
        out = runner.decode(torch.tensor([n[-1] for n in new]), kv)
        for r in range(len(new)):
            torch.testing.assert_close(
                out[r], _reference(model, ids[r], feats[r], new[r]).float(), atol=2e-5, rtol=1e-4
            )
        new = [n + [int(t)] for n, t in zip(new, out.argmax(-1), strict=True)]


@torch.inference_mode()
def test_prefill_after_a_reused_prefix_matches_full_forward(tiny):
    model, processor = tiny
    runner = ModelRunner(model, processor.tokenizer.pad_token_id)
    ids, feats = _rows(model, processor, 2)
    _, kv = runner.prefill([PrefillRow(ids[0], None, feats[0])])
    cut = 20  # inside the image block: the suffix carries the rest of the image's features
    past = [(k[:, :, :cut], v[:, :, :cut]) for k, v in kv.row(0)]
    before = int((ids[0][:cut] == model.image_token_id).sum())
    logits, _ = runner.prefill(
        [
            PrefillRow(ids[0][cut:], past, feats[0].reshape(-1, feats[0].shape[-1])[before:]),
            PrefillRow(ids[1], None, feats[1]),
        ]
    )
    torch.testing.assert_close(
        logits[0], _reference(model, ids[0], feats[0], []).float(), atol=2e-5, rtol=1e-4
    )
    torch.testing.assert_close(
        logits[1], _reference(model, ids[1], feats[1], []).float(), atol=2e-5, rtol=1e-4
    )


def test_fast_decoder_registry_is_explicit(tiny, tiny_glm):
    assert FAST_DECODERS["qwen2"] is LlamaStyleDecoder and "glm4" not in FAST_DECODERS
    assert LlamaStyleDecoder.supports(tiny[0].language_model)
    assert ModelRunner(tiny[0], 0, fast_decode="off").decode_path == "transformers"


@pytest.fixture(scope="module")
def tiny_llama(experts, tmp_path_factory):
    return load(write_tiny_checkpoint(experts, tmp_path_factory.mktemp("llama") / "ckpt", "llama"))


@pytest.mark.parametrize(("fixture", "compiled"), [("tiny", False), ("tiny_llama", False), ("tiny", True)])
@torch.inference_mode()
def test_static_decode_matches_full_forward(fixture, compiled, request):
    """The static step over the slot pool (eager on CPU): rows adopted, joined, leaving, and a
    multi-token (draft-verifying) step, each position against a full forward, attention over column
    buckets narrower than the slot and growing across a bucket's end. `compiled`: its layers through
    torch.compile (inductor's C++ kernels on CPU), same numbers to float tolerance."""
    model, processor = request.getfixturevalue(fixture)
    runner = ModelRunner(
        model,
        processor.tokenizer.pad_token_id,
        static_decode="on",
        slots=8,
        capacity=128,
        compile_decode=compiled,
    )
    assert (
        runner.decode_path == ("static+compiled" if compiled else "static") and runner.max_positions() == 128
    )
    static = runner.static
    static.min_columns = 16  # the tiny rows are 30-70 tokens long
    widths = []
    forward = static.forward
    static.forward = lambda tokens, kv, b, width: widths.append(width) or forward(tokens, kv, b, width)
    ids, feats = _rows(model, processor, 5)
    logits, first = runner.prefill([PrefillRow(i, None, f) for i, f in zip(ids[:3], feats[:3], strict=True)])
    kv = runner.adopt(first)
    assert isinstance(kv, SlotKV) and kv.lens == [int(i.numel()) for i in ids[:3]]
    new = [[int(t)] for t in logits.argmax(-1)]
    for step in range(4):
        if step == 1:
            more_logits, more = runner.prefill(
                [PrefillRow(i, None, f) for i, f in zip(ids[3:], feats[3:], strict=True)]
            )
            kv.merge(more)
            new += [[int(t)] for t in more_logits.argmax(-1)]
        if step == 2:
            kv.select([0, 2, 3, 4])
            ids, feats, new = ([x[i] for i in (0, 2, 3, 4)] for x in (ids, feats, new))
        if step == 3:  # three tokens per row at once, only the first two kept
            drafts = [n[-1:] + [7, 9] for n in new]
            out = runner.step(torch.tensor(drafts), kv)  # (B, 3, V)
            kv.advance(2, 3)
            for r in range(len(new)):
                for j in range(3):
                    want = _reference(model, ids[r], feats[r], new[r] + drafts[r][1 : j + 1]).float()
                    torch.testing.assert_close(out[r, j], want, atol=2e-5, rtol=1e-4)
            new = [n + [7, int(o[1].argmax())] for n, o in zip(new, out, strict=True)]  # kept: last, 7
            continue
        out = runner.decode(torch.tensor([n[-1] for n in new]), kv)
        for r in range(len(new)):
            torch.testing.assert_close(
                out[r], _reference(model, ids[r], feats[r], new[r]).float(), atol=2e-5, rtol=1e-4
            )
        new = [n + [int(t)] for n, t in zip(new, out.argmax(-1), strict=True)]
    assert kv.lens == [int(i.numel()) + len(n) - 1 for i, n in zip(ids, new, strict=True)]
    assert runner.decode_path == ("static+compiled" if compiled else "static")  # compiling did not fail
    assert min(widths) < 128 and len(set(widths)) >= 2, widths  # narrower than the slot, a bucket crossed


def test_graph_keys_cover_every_step_the_engine_can_run(tiny):
    """`warm_up` captures `graph_keys`: they must be exactly the graphs that steps of 1..6 rows of one
    token, and a lone row's verify steps of 2 and 3 tokens, can ask for at any row length (a pool of
    6 slots, not a power of two; a slot of 200 columns, not one either)."""
    model, processor = tiny
    runner = ModelRunner(model, processor.tokenizer.pad_token_id, static_decode="on", slots=6, capacity=200)
    static = runner.static
    static.min_columns = 16
    lm = model.language_model
    cfg = lm.config
    kv = SlotKV(6, 200, cfg.num_hidden_layers, cfg.num_key_value_heads, 8, lm.dtype, lm.device)
    steps = [(6, 1), (1, 2), (1, 3)]
    keys = static.graph_keys(kv, steps)
    assert static.column_buckets(200) == [16, 32, 64, 128, 200]
    reached = set()
    for most, n in steps:
        for b in range(1, most + 1):
            for length in range(1, 200 - n + 1):
                kv.lens = [length] * b
                reached.add((static.batch_bucket(b, 6), n, static.columns(kv, n)))
    assert set(keys) == reached and len(keys) == len(set(keys))
    assert {b for b, n, _ in keys if n == 1} == {1, 2, 4, 6}


@torch.inference_mode()
def test_warm_up_allocates_the_pool_and_compiles_before_any_request(tiny):
    """`ModelRunner.warm_up` (what `Engine.start` runs): the KV pool exists before the first request,
    and a compiled step has compiled for the engine's step shapes, so rows of any batch size and a
    verify step then compile nothing (on a GPU it captures the graphs: tests/infer/test_gpu.py)."""
    from torch._dynamo.utils import counters

    model, processor = tiny
    pad = processor.tokenizer.pad_token_id
    plain = ModelRunner(model, pad, static_decode="on", slots=4, capacity=128)
    assert plain.warm_up([(4, 1)]).startswith("static decode warmed up in")
    lm = model.language_model
    dims = (lm.config.num_hidden_layers, lm.config.num_key_value_heads, plain.static.head_dim, lm.dtype)
    assert plain.kv_pool_bytes == SlotKV.size(4, 128, *dims) > 0 and plain._slot_kv.batch_size == 0
    torch._dynamo.reset()
    runner = ModelRunner(model, pad, static_decode="on", slots=4, capacity=128, compile_decode=True)
    done = runner.warm_up([(4, 1), (1, 2), (1, 3)])
    assert "KV pool" in done and "step compiled" in done and runner.kv_pool_bytes > 0
    compiled = counters["stats"]["unique_graphs"]
    assert compiled > 0
    ids, feats = _rows(model, processor, 4)
    logits, first = runner.prefill([PrefillRow(ids[0], None, feats[0])])
    kv = runner.adopt(first)
    runner.step(torch.tensor([[int(logits.argmax()), 7, 9]]), kv)  # a verify step of 3 tokens
    kv.advance(1, 3)
    more_logits, more = runner.prefill(
        [PrefillRow(i, None, f) for i, f in zip(ids[1:], feats[1:], strict=True)]
    )
    kv.merge(more)
    for b in (4, 3, 2):
        kv.select(list(range(b)))
        runner.decode(torch.full((b,), 5), kv)
    assert counters["stats"]["unique_graphs"] == compiled  # nothing compiled at a request
    assert runner.decode_path == "static+compiled"


def test_a_kv_pool_too_large_for_the_device_is_a_clear_error_at_warm_up(tiny, monkeypatch):
    """The pool is allocated at start: running out of device memory then says which pool and what to
    lower, not a bare allocator message at a user's first request."""
    from seechat.infer import runner as runner_module

    class NoMemory(SlotKV):
        def __init__(self, *args):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 7.50 GiB")

    model, processor = tiny
    runner = ModelRunner(model, processor.tokenizer.pad_token_id, static_decode="on", slots=32, capacity=4096)
    monkeypatch.setattr(runner_module, "SlotKV", NoMemory)
    cfg = model.language_model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    itemsize = model.language_model.dtype.itemsize
    need = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * itemsize * 32 * 4096
    with pytest.raises(RuntimeError, match=rf"32 slots x 4096 tokens = {need / 1e9:.2f} GB.*--max-model-len"):
        runner.warm_up([(32, 1)])


VIEW_OPS = {  # aten ops that launch no kernel
    *("view", "_unsafe_view", "reshape", "transpose", "t", "permute", "expand", "slice", "select"),
    *("unsqueeze", "squeeze", "as_strided", "alias", "detach", "split", "split_with_sizes", "chunk"),
    *("narrow", "contiguous", "empty", "empty_like", "empty_strided", "lift_fresh", "result_type"),
}


def _kernel_ops(layers: int) -> Counter:
    """Top-level aten ops of one bf16 static step (batch 1, one token) with the CUDA RMSNorm: on a
    GPU each is a kernel inside the captured graph."""
    cfg = Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100,
    )  # fmt: skip
    lm = AutoModelForCausalLM.from_config(cfg).eval().to(torch.bfloat16)
    k = [torch.zeros(1, 2, 4, 16, dtype=torch.bfloat16) for _ in range(layers)]
    prefilled = BatchKV([(x, x) for x in k], torch.ones(1, 4, dtype=torch.bool), torch.tensor([4]))
    kv = SlotKV.like(1, 64, prefilled)
    step = StaticDecoder(lm, 64, graphs=False)
    step.rms = _fused_rms
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        step.forward(torch.tensor([[5]]), kv, 1, 64)
    names = (e.name.removeprefix("aten::") for e in prof.events() if e.cpu_parent is None)
    return Counter(n for n in names if n not in VIEW_OPS)


def test_static_step_runs_few_kernels_per_layer():
    """At batch 1 a decode step's time outside the weight reads is mostly per-kernel overhead: the
    eager static step (what a CUDA graph replays) runs 19 kernels a layer (29 before Q and K rotated
    together, the RMSNorm in two kernels and the rotary embedding in four): 4 products, 2 norms of
    2 kernels, rotary (2 muls, roll, add), 2 KV writes, attention, 2 residual adds, SiLU, the gate."""
    two, four = _kernel_ops(2), _kernel_ops(4)
    per_layer = {op: (four[op] - two[op]) // 2 for op in four if four[op] != two[op]}
    assert sum(per_layer.values()) <= 19, per_layer


@torch.inference_mode()
def test_static_decode_reads_attention_output_in_any_layout(tiny, monkeypatch):
    """On CUDA, SDPA may return (b, h, L, D) as a transposed view of a (b, L, h, D) buffer (flash
    and memory-efficient kernels do); the static step must not assume contiguity (found on an
    H200: `.view` failed there and every CUDA decode erred). Here CPU SDPA is made to do the same."""
    sdpa = F.scaled_dot_product_attention

    def transposed_layout(*args, **kwargs):
        out = sdpa(*args, **kwargs)
        return out.transpose(1, 2).contiguous().transpose(1, 2)  # same values, CUDA-like strides

    monkeypatch.setattr(F, "scaled_dot_product_attention", transposed_layout)
    model, processor = tiny
    runner = ModelRunner(model, processor.tokenizer.pad_token_id, static_decode="on", slots=4, capacity=128)
    ids, feats = _rows(model, processor, 2)
    logits, first = runner.prefill([PrefillRow(i, None, f) for i, f in zip(ids, feats, strict=True)])
    kv = runner.adopt(first)
    new = [[int(t)] for t in logits.argmax(-1)]
    out = runner.decode(torch.tensor([n[-1] for n in new]), kv)
    for r in range(len(new)):
        want = _reference(model, ids[r], feats[r], new[r]).float()
        torch.testing.assert_close(out[r], want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_equals_the_transformers_formula(dtype):
    """The static step's CUDA RMSNorm (two kernels) computes what transformers computes, bit for bit."""
    x, w = torch.randn(3, 5, 64).to(dtype), torch.randn(64).to(dtype)
    torch.testing.assert_close(_fused_rms(x, w, 1e-6), rms_norm(x, w, 1e-6), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_equals_the_transformers_rotary_embedding_exactly(dtype):
    """The static step's rotary embedding (roll and a signed sin table: four kernels) gives
    transformers' `apply_rotary_pos_emb` bit for bit, queries and keys rotated together."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    q, k = torch.randn(2, 8, 5, 64).to(dtype), torch.randn(2, 2, 5, 64).to(dtype)
    cos, sin = torch.randn(2, 5, 64).to(dtype), torch.randn(2, 5, 64).to(dtype)
    both = rope(torch.cat([q, k], dim=1), cos[:, None], signed_sin(sin)[:, None])
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(both[:, :8], want_q) and torch.equal(both[:, 8:], want_k)


def test_fused_projections_reuse_the_weights_and_leave_the_model_as_it_was(tiny_llama, tmp_path):
    """The static step's fused Q/K/V and gate/up matrices are the modules' own storage (no second
    copy, also when a second engine fuses them again); the model computes, saves and reloads
    exactly as before (Llama: no biases; Qwen2, with Q/K/V biases, below and through
    test_static_decode_matches_full_forward)."""
    model, _ = tiny_llama
    lm = model.language_model
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        before = lm(input_ids=ids).logits
    attn, mlp = lm.get_decoder().layers[0].self_attn, lm.get_decoder().layers[0].mlp
    projections = [attn.q_proj, attn.k_proj, attn.v_proj]
    qkv, bias = fuse_projections(projections)
    gate_up, _ = fuse_projections([mlp.gate_proj, mlp.up_proj])
    assert bias is None and qkv.shape[0] == sum(p.weight.shape[0] for p in projections)
    assert attn.q_proj.weight.data_ptr() == qkv.data_ptr()
    assert attn.v_proj.weight.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == gate_up.untyped_storage().data_ptr()
    # a second engine on the same model fuses again: the same storage, no third copy of the weights
    again_qkv, again_bias = fuse_projections(projections)
    assert again_bias is None and again_qkv.data_ptr() == qkv.data_ptr() and torch.equal(again_qkv, qkv)
    assert attn.v_proj.weight.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(lm(input_ids=ids).logits, before, rtol=0, atol=0)
    lm.save_pretrained(tmp_path / "lm")
    again = type(lm).from_pretrained(tmp_path / "lm")
    for (name, p), (_, q) in zip(lm.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_fusing_projections_with_biases_again_reuses_the_fused_storage(tiny):
    """Qwen2's Q/K/V have biases: fused twice (two engines on one model), weights and biases each
    stay one storage with the same values."""
    model, processor = tiny
    attn = model.language_model.get_decoder().layers[0].self_attn
    first = fuse_projections([attn.q_proj, attn.k_proj, attn.v_proj])
    second = fuse_projections([attn.q_proj, attn.k_proj, attn.v_proj])
    assert first[1] is not None
    for a, b in zip(first, second, strict=True):
        assert a.data_ptr() == b.data_ptr() and a.shape == b.shape and torch.equal(a, b)
    assert attn.k_proj.bias.untyped_storage().data_ptr() == first[1].untyped_storage().data_ptr()


def test_fusing_projections_where_only_some_have_a_bias_is_refused():
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 2, bias=False)
    with pytest.raises(ValueError, match="only some have a bias"):
        fuse_projections([a, b])


def test_projections_fused_under_inference_mode_still_train():
    """An engine may be built under inference_mode; the parameters it rebinds must still take part
    in a backward pass afterwards."""
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 2)
    with torch.inference_mode():
        fuse_projections([a, b])
    assert not a.weight.is_inference() and not b.bias.is_inference()
    x = torch.randn(5, 4)
    (a(x).sum() + b(x).sum()).backward()
    assert a.weight.grad is not None and b.bias.grad is not None


@torch.inference_mode()
def test_kv_pool_bytes_counts_the_static_slot_pool_once_allocated(tiny):
    model, processor = tiny
    runner = ModelRunner(model, processor.tokenizer.pad_token_id, static_decode="on", slots=4, capacity=128)
    assert runner.kv_pool_bytes == 0  # allocated at the first request
    ids, feats = _rows(model, processor, 1)
    runner.adopt(runner.prefill([PrefillRow(ids[0], None, feats[0])])[1])
    cfg = model.language_model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_layer = 2 * 4 * cfg.num_key_value_heads * 128 * head_dim * model.language_model.dtype.itemsize
    assert runner.kv_pool_bytes == cfg.num_hidden_layers * per_layer
    assert ModelRunner(model, processor.tokenizer.pad_token_id, static_decode="off").kv_pool_bytes == 0
