"""Label masking: exactly the assistant replies (and their end-of-turn token) are supervised."""

from __future__ import annotations

import pytest
import torch
from jinja2.exceptions import TemplateError as JinjaTemplateError
from PIL import Image
from transformers import CLIPImageProcessor

from seechat.data.char_tokenizer import CHATML_TEMPLATE, build_char_tokenizer
from seechat.data.conversation import (
    FALLBACK_TEMPLATE,
    IGNORE_INDEX,
    NoSupervisedTokensError,
    TemplateError,
    accept_content_parts,
    render_with_spans,
    text_messages,
    tokenize_with_labels,
)
from seechat.data.processor import SeeChatProcessor
from tests.helpers import CONVERSATION

# A Llama-3-style template (header tokens, <|eot_id|> ends a turn), spelled with our specials.
LLAMA3_STYLE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '<|im_end|>\n\n' + m['content'] + '<|endoftext|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_end|>\n\n' }}{% endif %}"
)


def supervised_text(tok, messages) -> str:
    text, spans = render_with_spans(tok, messages)
    ids, labels = tokenize_with_labels(tok, text, spans)
    return tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])


@pytest.mark.parametrize(
    ("template", "eot"),
    [(CHATML_TEMPLATE, "<|im_end|>"), (FALLBACK_TEMPLATE, "<|endoftext|>"), (LLAMA3_STYLE, "<|endoftext|>")],
)
def test_only_assistant_replies_are_supervised(template, eot):
    tok = build_char_tokenizer(["".join(m["content"] for m in CONVERSATION)], chat_template=template)
    if template == FALLBACK_TEMPLATE:
        tok.eos_token = "<|endoftext|>"
    assert supervised_text(tok, CONVERSATION) == f"红色的圆形。{eot}红色。{eot}"


def test_fallback_template_reads_like_chinese_qa():
    tok = build_char_tokenizer(["问答你好"], chat_template=FALLBACK_TEMPLATE)
    tok.eos_token = "<|endoftext|>"
    text = tok.apply_chat_template(
        [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好"}], tokenize=False
    )
    assert text == "问：你好\n答：好<|endoftext|>\n"


def test_template_that_rewrites_history_is_refused():
    # Drops earlier assistant turns from history: replies cannot be located turn by turn.
    bad = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ m['role'] + ':' + m['content'] + '\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    )
    tok = build_char_tokenizer(["红色的圆形你是助手图里有什么是颜"], chat_template=bad)
    with pytest.raises(TemplateError, match="label masking"):
        render_with_spans(tok, CONVERSATION)


def test_processor_without_template_gets_fallback_and_truncation_is_loud():
    from transformers import CLIPImageProcessor

    tok = build_char_tokenizer(["红色的圆形你是助手图里有什么是颜"], chat_template=None)
    proc = SeeChatProcessor(tok, CLIPImageProcessor(), num_image_tokens=4, max_length=12)
    assert "问：" in tok.chat_template
    with pytest.raises(NoSupervisedTokensError, match="max_length=12"):
        proc.encode_conversation(
            [{"role": "user", "content": "图里有什么？" * 3}, {"role": "assistant", "content": "红色"}]
        )


def test_stop_tokens_come_from_the_template():
    tok = build_char_tokenizer(["你好"])
    proc = SeeChatProcessor(tok, None, num_image_tokens=1)
    assert tok.convert_tokens_to_ids("<|im_end|>") in proc.stop_token_ids


PARTS = [
    {"role": "system", "content": [{"type": "text", "text": "你是助手。"}]},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "比较"},
            {"type": "image"},
            {"type": "text", "text": "和"},
            {"type": "image"},
            {"type": "text", "text": "是什么颜色？"},
        ],
    },
    {"role": "assistant", "content": "红色。"},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "图里有什么？"}]},
]


def test_list_of_parts_is_the_string_form_with_markers():
    assert text_messages(PARTS, "<image>") == [
        {"role": "system", "content": "你是助手。"},
        {"role": "user", "content": "比较<image>\n和<image>\n是什么颜色？"},
        {"role": "assistant", "content": "红色。"},
        {"role": "user", "content": "<image>\n图里有什么？"},
    ]
    with pytest.raises(ValueError, match="message 0 part 0"):
        text_messages([{"role": "user", "content": [{"type": "video"}]}], "<image>")


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, FALLBACK_TEMPLATE, LLAMA3_STYLE])
def test_a_template_with_the_parts_preamble_renders_both_forms_alike(template):
    tok = build_char_tokenizer(
        ["比较和是什么颜色？你是助手红色图里有"], chat_template=accept_content_parts(template, "<image>")
    )
    plain = build_char_tokenizer(["比较和是什么颜色？你是助手红色图里有"], chat_template=template)
    strings = text_messages(PARTS, "<image>")
    for n in range(1, len(PARTS) + 1):
        for gen in (False, True):
            expected = plain.apply_chat_template(strings[:n], tokenize=False, add_generation_prompt=gen)
            assert tok.apply_chat_template(PARTS[:n], tokenize=False, add_generation_prompt=gen) == expected
            assert tok.apply_chat_template(strings[:n], tokenize=False, add_generation_prompt=gen) == expected
    with pytest.raises(JinjaTemplateError, match="image or text, not video"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}], tokenize=False)


def test_processor_takes_parts_with_or_without_their_images():
    tok = build_char_tokenizer(["比较和是什么颜色？你是助手红色图里有"])
    proc = SeeChatProcessor(
        tok,
        CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        num_image_tokens=3,
    )
    red, blue, green = (Image.new("RGB", (20, 20), c) for c in ("red", "blue", "green"))
    reference = proc.encode_conversation(
        text_messages(PARTS, "<image>") + [{"role": "assistant", "content": "绿色。"}], [red, blue, green]
    )
    carried = [dict(m) for m in PARTS] + [{"role": "assistant", "content": "绿色。"}]
    carried[1] = {
        "role": "user",
        "content": [
            {"type": "text", "text": "比较"},
            {"type": "image", "image": red},
            {"type": "text", "text": "和"},
            {"type": "image", "image": blue},
            {"type": "text", "text": "是什么颜色？"},
        ],
    }
    carried[3] = {
        "role": "user",
        "content": [{"type": "image", "image": green}, {"type": "text", "text": "图里有什么？"}],
    }
    for messages, images in (
        (PARTS + [{"role": "assistant", "content": "绿色。"}], [red, blue, green]),
        (carried, []),
    ):
        enc = proc.encode_conversation(messages, images)
        assert torch.equal(enc.input_ids, reference.input_ids) and torch.equal(enc.labels, reference.labels)
        assert torch.equal(enc.pixel_values, reference.pixel_values)
    with pytest.raises(ValueError, match="one way"):
        proc.encode_prompt(carried, [red])
