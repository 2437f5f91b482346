"""On a GPU: the static decode path (slotted KV, CUDA graphs) gives the greedy tokens of the plain
path. Skipped without CUDA (CI has none); benchmarks/gpu_session.sh runs it on a lent GPU."""

from __future__ import annotations

import pytest
import torch

from seechat.infer.chat import prompt_ids
from seechat.infer.engine import Engine, EngineConfig
from seechat.infer.sampling import SamplingParams
from seechat.model import load
from tests.infer.tiny_engine import coloured, generate_concurrently

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LONG = SamplingParams(max_new_tokens=24)
QUESTIONS = ["<image>\n你好", "<image>\n图里有什么？请描述颜色和形状", "是什么颜色", "<image>\n左右上下"]


def _prompts(processor):
    return [
        (
            prompt_ids(processor, [{"role": "user", "content": q}], q.count("<image>")),
            [coloured(i)] * q.count("<image>"),
        )
        for i, q in enumerate(QUESTIONS * 2)
    ]


def _plain(model, processor, prompts) -> list[list[int]]:
    config = EngineConfig(static_decode="off", fast_decode="off", speculative_tokens=0, prefix_cache_mb=0)
    with Engine(model, processor, config) as plain:
        assert plain.runner.decode_path == "transformers"
        return [plain.generate(ids, im, LONG, cache_prefix=False).token_ids for ids, im in prompts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_gives_the_plain_greedy_tokens(tiny_ckpt, dtype):
    model, processor = load(tiny_ckpt["qwen2"], device="cuda")
    model = model.to(dtype)
    prompts = _prompts(processor)
    config = EngineConfig(max_batch_size=4, max_model_len=256)  # static_decode="auto": on, on CUDA
    with Engine(model, processor, config) as engine:
        assert engine.runner.decode_path == "static+cuda-graphs"
        engine.runner.static.min_columns = 16  # graphs of several column buckets (rows of 30-70 tokens)
        alone = [engine.generate(ids, im, LONG, cache_prefix=False).token_ids for ids, im in prompts]
        if dtype == torch.float32:  # bf16 kernels of the two paths round differently
            assert alone == _plain(model, processor, prompts)
        else:  # the same step run eagerly: captured graphs replay exactly what they recorded
            engine.runner.static.graphs = False
            assert [
                engine.generate(ids, im, LONG, cache_prefix=False).token_ids for ids, im in prompts
            ] == alone
            engine.runner.static.graphs = True
            return  # batches of other sizes take other bf16 kernels: compared in fp32 only
        requests = [  # rows leave at different steps
            (*prompts[j % len(prompts)], SamplingParams(max_new_tokens=24 - j % 5)) for j in range(10)
        ]
        results = generate_concurrently(engine, requests)
        assert results == [alone[j % len(prompts)][: 24 - j % 5] for j in range(10)]
        assert engine.counters["max_running"] > 1
        keys = engine.runner.static._graphs  # (batch bucket, new tokens, column bucket)
        assert len({b for b, _, _ in keys}) >= 2 and len({w for _, _, w in keys}) >= 2


def test_start_captures_every_graph_the_engine_then_uses(tiny_ckpt):
    """`Engine.start` warms up: before any request it captures every graph its decode steps can need
    (batch buckets up to max_batch_size, each column bucket, a lone request's verify steps). Serving
    alone, with speculation, and concurrently then captures nothing more, and the greedy tokens are
    the plain path's (fp32)."""
    model, processor = load(tiny_ckpt["qwen2"], device="cuda")
    prompts = _prompts(processor)
    engine = Engine(model, processor, EngineConfig(max_batch_size=4, max_model_len=256))
    static = engine.runner.static
    static.min_columns = 16  # several column buckets for rows of 30-70 tokens
    with engine:
        warmed = set(static._graphs)
        assert warmed == set(static.graph_keys(engine.runner._slot_kv, engine.decode_shapes()))
        assert engine.runner.kv_pool_bytes > 0 and static.graphs
        alone = [engine.generate(ids, im, LONG, cache_prefix=False).token_ids for ids, im in prompts]
        results = generate_concurrently(engine, [(*prompts[j], LONG) for j in range(6)])
        assert set(static._graphs) == warmed  # nothing captured at a request
        assert engine.counters["max_running"] > 1
    assert alone == _plain(model, processor, prompts) and results == alone[:6]


def test_compiled_static_decode_gives_the_plain_greedy_tokens(tiny_ckpt):
    """The static step's layers through torch.compile (Triton kernels inside the CUDA graphs): in
    fp32 the greedy tokens of the plain path, alone and with rows of several batch buckets."""
    model, processor = load(tiny_ckpt["qwen2"], device="cuda")
    prompts = _prompts(processor)
    config = EngineConfig(max_batch_size=4, max_model_len=256, compile_decode=True)
    with Engine(model, processor, config) as engine:
        alone = [engine.generate(ids, im, LONG, cache_prefix=False).token_ids for ids, im in prompts]
        assert engine.runner.decode_path == "static+compiled+cuda-graphs"  # compiling did not fail
        assert alone == _plain(model, processor, prompts)
        results = generate_concurrently(engine, [(*prompts[j], LONG) for j in range(6)])
        assert results == alone[:6]


@torch.inference_mode()
def test_static_step_norm_and_rotary_kernels_equal_the_transformers_formulas_in_bf16():
    """On CUDA in bf16, the static step's RMSNorm (torch's fused kernel, then the weight) and its
    rotary embedding (roll, signed sin) give transformers' numbers bit for bit, as on the CPU."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    from seechat.infer.ops import rms_norm, rope, signed_sin
    from seechat.infer.static_decode import _fused_rms

    dev, bf16 = "cuda", torch.bfloat16
    x, w = torch.randn(4, 3, 3584, device=dev).to(bf16), torch.randn(3584, device=dev).to(bf16)
    assert torch.equal(_fused_rms(x, w, 1e-6), rms_norm(x, w, 1e-6))
    q, k = torch.randn(2, 28, 3, 128, device=dev).to(bf16), torch.randn(2, 4, 3, 128, device=dev).to(bf16)
    cos, sin = torch.randn(2, 3, 128, device=dev).to(bf16), torch.randn(2, 3, 128, device=dev).to(bf16)
    both = rope(torch.cat([q, k], dim=1), cos[:, None], signed_sin(sin)[:, None])
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(both[:, :28], want_q) and torch.equal(both[:, 28:], want_k)
