"""The runner's decode paths give the logits of a full transformers forward, with holes and joins."""

from __future__ import annotations

import pytest
import torch

from seechat.infer.chat import prompt_ids
from seechat.infer.runner import FAST_DECODERS, LlamaStyleDecoder, ModelRunner, PrefillRow
from tests.infer.tiny_engine import coloured

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
