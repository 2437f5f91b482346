"""A deep-fusion checkpoint served: the runner's fast and generic decode paths give the logits of a
full forward (image KV made by the visual experts), the engine and the HTTP API give the reference
greedy tokens, and a deep model trained by `train` answers a text-only `seechat chat` exactly as the
base LM does (greedy), as does a shallow model trained with a frozen LM."""

from __future__ import annotations

import io

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from seechat.cli import main
from seechat.config import TrainableConfig, load_config
from seechat.infer.chat import prompt_ids
from seechat.infer.engine import Engine
from seechat.infer.generate import generate
from seechat.infer.runner import ModelRunner, PrefillRow
from seechat.infer.sampling import SamplingParams
from seechat.model import apply_trainable, build, load
from seechat.model.checkpoint import write_checkpoint
from seechat.train.loop import train
from tests.conftest import tiny_overrides
from tests.helpers import model_config
from tests.infer.test_runner import _reference, _rows
from tests.infer.tiny_engine import coloured, data_uri
from tests.serve.conftest import MODEL_NAME, make_server
from tests.train.test_loop import STAGE2

GREEDY = SamplingParams(max_new_tokens=10)


@pytest.fixture(scope="module")
def deep(experts, tmp_path_factory):
    """A tiny deep-fusion qwen2 checkpoint whose experts differ from the LM's weights, loaded."""
    torch.manual_seed(0)
    model, processor = build(model_config(experts, "clip", "qwen2", fusion="deep"))
    apply_trainable(model, TrainableConfig(lm="frozen", experts="full"))
    with torch.no_grad():
        for p in model.visual_experts.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    d = tmp_path_factory.mktemp("deep") / "ckpt"
    write_checkpoint(model, processor, d)
    return load(d)


@pytest.mark.parametrize("fast_decode", ["on", "off"])
@torch.inference_mode()
def test_decode_after_a_deep_fusion_prefill_matches_full_forward(deep, fast_decode):
    model, processor = deep
    runner = ModelRunner(model, processor.tokenizer.pad_token_id, fast_decode=fast_decode)
    assert runner.decode_path == ("fast" if fast_decode == "on" else "transformers")
    ids, feats = _rows(model, processor, 3)
    logits, kv = runner.prefill([PrefillRow(i, None, f) for i, f in zip(ids, feats, strict=True)])
    new = [[int(t)] for t in logits.argmax(-1)]
    for _ in range(3):
        out = runner.decode(torch.tensor([n[-1] for n in new]), kv)
        for r in range(len(new)):
            ref = _reference(model, ids[r], feats[r], new[r]).float()
            torch.testing.assert_close(out[r], ref, atol=2e-5, rtol=1e-4)
        new = [n + [int(t)] for n, t in zip(new, out.argmax(-1), strict=True)]
    # a prefix reused up to the middle of the image block: the suffix's image tokens still route
    _, kv = runner.prefill([PrefillRow(ids[0], None, feats[0])])
    cut = 20
    past = [(k[:, :, :cut], v[:, :, :cut]) for k, v in kv.row(0)]
    before = int((ids[0][:cut] == model.image_token_id).sum())
    logits, _ = runner.prefill([PrefillRow(ids[0][cut:], past, feats[0][before:])])
    torch.testing.assert_close(
        logits[0], _reference(model, ids[0], feats[0], []).float(), atol=2e-5, rtol=1e-4
    )


def test_engine_and_api_give_the_reference_greedy_tokens(deep):
    model, processor = deep
    messages = [{"role": "user", "content": "<image>\n图里有什么？"}]
    ids = prompt_ids(processor, messages, 1)
    ref = generate(
        model, ids[None], None, processor.preprocess_images([coloured(0)]), GREEDY, processor.stop_token_ids
    )[0]
    with Engine(model, processor) as engine:
        assert engine.generate(ids, [coloured(0)], GREEDY, cache_prefix=False).token_ids == ref
    with make_server(deep) as server:
        body = {
            "model": MODEL_NAME,
            "max_tokens": 10,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_uri(coloured(0))}},
                        {"type": "text", "text": "图里有什么？"},
                    ],
                }
            ],
        }
        reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()
    assert reply["choices"][0]["message"]["content"] == processor.decode(ref)


def base_greedy_reply(lm_path: str, tokenizer_path: str, question: str, stop_ids: list[int], n: int) -> str:
    """The base LM's own greedy reply through transformers' `generate`, nothing of seechat."""
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    lm = AutoModelForCausalLM.from_pretrained(lm_path).eval()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    out = lm.generate(
        ids, max_new_tokens=n, do_sample=False, eos_token_id=stop_ids, pad_token_id=tok.pad_token_id
    )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("mode", ["deep", "shallow_frozen"])
def test_seechat_chat_on_a_text_only_prompt_gives_the_base_lms_greedy_reply(
    tiny_world, tmp_path, monkeypatch, capsys, mode
):
    out = tmp_path / mode
    over = {
        "train.max_steps": 2,
        "train.batch_size": 4,
        "optim.lr": 5e-2,  # large, so that the trained parts really move
        "data.paths": f"{tiny_world['world']}/instruct/train.jsonl",
        "data.image_root": tiny_world["world"],
        "trainable.lm": "frozen",
        "model.fusion": "deep" if mode == "deep" else "shallow",
        "train.init_from": "",
    }
    cfg = load_config(STAGE2, tiny_overrides(tiny_world, str(out), **over))
    train(cfg)
    model, processor = load(out)
    assert (model.visual_experts is not None) == (mode == "deep")
    question = "图中有几个图形？"
    n = 12
    want = base_greedy_reply(tiny_world["lm"], tiny_world["tokenizer"], question, processor.stop_token_ids, n)
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO(question + "\n"))
    assert main(["chat", "--model", str(out), "--max-new-tokens", str(n)]) == 0
    printed = capsys.readouterr().out
    assert want and f"助手> {want}\n" in printed
