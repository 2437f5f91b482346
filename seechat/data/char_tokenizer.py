"""A character-level Chinese tokenizer, built by the project for its mini experts and tests.

Chinese text is naturally character-level; for the mini world's few-hundred-character vocabulary
one token per character is both simplest and what lets a tiny LM learn in minutes. The result is
an ordinary `PreTrainedTokenizerFast` (the `tokenizers` library underneath: offsets, batching,
`save_pretrained`) with a ChatML chat template, so every code path is the one a real LLM takes.

Not a BPE trainer: real LLMs bring their own tokenizer. It sits in the data layer (not in
`seechat.mini`) because the tiny test models (`seechat.model.tiny`) build it too.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<|pad|>", "<|unk|>", "<|bos|>", "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
IMAGE = "<image>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, IM_START, IM_END, IMAGE)

# ChatML, as Qwen uses: the assistant turn ends with <|im_end|>, which is also the stop token.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Printable ASCII is always in the vocabulary so that numbers, boxes and Latin words never go <unk>.
ASCII = [chr(c) for c in range(32, 127)] + ["\n", "\t"]


def build_char_tokenizer(
    texts: Iterable[str] = (), extra_chars: Iterable[str] = (), chat_template: str | None = CHATML_TEMPLATE
) -> PreTrainedTokenizerFast:
    """One token per character seen in `texts` (plus ASCII and `extra_chars`), specials first."""
    chars = set(ASCII) | set(extra_chars)
    for t in texts:
        chars.update(t)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(chars):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=IM_END if chat_template else EOS,
        additional_special_tokens=[IM_START, IM_END, EOS, IMAGE],
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast
