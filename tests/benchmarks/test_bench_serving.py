"""The serving benchmark's correctness check: engine and transformers decode under one rule.

The tiny model is doctored so that its greedy reply reaches `<|im_end|>` after a few tokens, as the
trained mini model does: under the old rule (engine `ignore_eos` lets the stop token through,
transformers' `min_new_tokens` masks it) the two sides then continue differently and the check
said False for a correct engine.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_serving import Bench, greedy_agreement
from seechat.model import load, write_checkpoint
from seechat.model.export import export_llava_hf
from tests.infer.tiny_engine import coloured, write_tiny_checkpoint

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def stopping_bench(experts, tmp_path_factory):
    """A Bench over a tiny checkpoint whose greedy reply to `coloured(0)` ends with <|im_end|> at
    token 3: the stop token's output row copies (twice over) the row of the token greedy picks there."""
    root = tmp_path_factory.mktemp("bench_serving")
    ckpt = write_tiny_checkpoint(experts, root / "plain")
    bench = Bench(ckpt, _export(ckpt, root / "plain_llava"), NEW_TOKENS, max_batch=2)
    plain = bench.engine_tokens("seechat", coloured(0), through_stop=True)
    for engine in bench.engines.values():
        engine.close()
    model, processor = load(ckpt)
    stop = processor.stop_token_ids[-1]
    head = model.language_model.get_output_embeddings().weight
    assert head is not model.language_model.get_input_embeddings().weight  # prompt embeddings stay
    with torch.no_grad():
        head[stop] = 2 * head[plain[3]]
    write_checkpoint(model, processor, root / "stops")
    bench = Bench(root / "stops", _export(root / "stops", root / "stops_llava"), NEW_TOKENS, max_batch=2)
    yield bench, stop
    for engine in bench.engines.values():
        engine.close()


def _export(ckpt, out):
    export_llava_hf(ckpt, out)
    return out


def test_greedy_agreement_holds_when_the_reply_reaches_the_stop_token(stopping_bench):
    bench, stop = stopping_bench
    image = coloured(0)
    through = bench.engine_tokens("seechat", image, through_stop=True)
    assert len(through) == NEW_TOKENS and stop in through[1:-1]  # the case the check must handle
    assert bench.hf_tokens(image, through_stop=True) == through
    assert bench.engine_tokens("seechat", image, through_stop=False) == through[: through.index(stop)]
    assert greedy_agreement(bench, [image, coloured(1)]) == {
        name: {"through_stop": True, "stop": True} for name in bench.engines
    }


def test_the_old_rule_would_have_disagreed(stopping_bench):
    """transformers' min_new_tokens masks the stop token: a different continuation, not the rule
    the engine's ignore_eos follows. The check must not compare those two."""
    bench, _ = stopping_bench
    image = coloured(0)
    pixels = bench.processor.preprocess_images([image])
    with torch.inference_mode():
        masked = bench.llava.generate(
            input_ids=bench.ids[None],
            pixel_values=pixels,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            eos_token_id=bench.stop_ids,
            do_sample=False,
            pad_token_id=bench.processor.tokenizer.pad_token_id,
        )[0, bench.ids.numel() :].tolist()
    assert masked != bench.engine_tokens("seechat", image, through_stop=True)
