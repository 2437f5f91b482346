"""EN->ZH translation: placeholders, batching, sqlite cache, resume, flagging; tiny Marian and Qwen2
models."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from seechat.data.instruct import Conversation, Message, load_conversations, write_conversations
from seechat.data.translate import (
    TranslateStats,
    TranslationCache,
    cjk_ratio,
    load_translator,
    protect,
    restore,
    translate_file,
)

CONVERSATIONS = [
    Conversation(
        "a",
        ["1.jpg"],
        [
            Message("user", "<image>\nHow many cats are there?"),
            Message("assistant", "There are 3 cats, about 2.5 kg each."),
        ],
    ),
    Conversation(
        "b",
        [],
        [
            Message("system", "You are a helpful assistant."),
            Message("user", "Run `ls -la` please.\n```\nprint(1)\n```"),
            Message("assistant", "这是中文。"),  # already Chinese: copied, no model call
        ],
    ),
    Conversation(
        "c", [], [Message("user", "How many cats are there?"), Message("assistant", "See https://x.org/a")]
    ),
]
UNIQUE_LINES = 5  # "How many cats…" once; "There are [0]…"; "You are…"; "Run [0] please."; "See [0]"


class FakeTranslator:
    """Deterministic stand-in: Chinese text that keeps (or drops) the placeholders it was given."""

    def __init__(
        self, cache_id: str = "fake", drop_placeholders: bool = False, english: bool = False
    ) -> None:
        self.cache_id, self.drop, self.english = cache_id, drop_placeholders, english
        self.calls: list[list[str]] = []

    def translate_batch(self, texts: Sequence[str]) -> list[str]:
        self.calls.append(list(texts))
        out = []
        for text in texts:
            kept = "" if self.drop else " ".join(re.findall(r"\[\d+\]", text))
            out.append(f"still English {kept}" if self.english else f"译文{kept}")
        return out


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "en.jsonl"
    write_conversations(CONVERSATIONS, path)
    return path


def test_protect_and_restore_round_trip() -> None:
    text = "<image>\nRun `pip install x` at 12:30, 1,000 times (42%): https://a.b/c\n```py\nx = 1\n```"
    masked = protect(text)
    assert "pip" not in masked.text and "12" not in masked.text and "<image>" not in masked.text
    assert masked.originals[0] == "<image>" and masked.originals[-1] == "```py\nx = 1\n```"
    assert restore(masked.text, masked) == (text, [])
    dropped, problems = restore(masked.text.replace("[1]", ""), masked)
    assert problems == ["placeholders lost: [1]"]
    _, problems = restore(masked.text + " [1] [9]", masked)
    assert problems == ["placeholders duplicated: [1]", "placeholders invented: [9]"]


def test_literal_brackets_survive() -> None:
    masked = protect("see [1] and [x]")
    assert restore(masked.text, masked) == ("see [1] and [x]", [])


def test_cjk_ratio() -> None:
    assert cjk_ratio("这是猫") == 1.0 and cjk_ratio("cat") == 0.0 and cjk_ratio("[0] 12") == 1.0
    assert cjk_ratio("猫 cat") == pytest.approx(1 / 4)


def test_translate_file_restores_batches_and_caches(tmp_path: Path, source: Path) -> None:
    fake = FakeTranslator()
    cache = tmp_path / "cache.sqlite"
    stats = translate_file(source, tmp_path / "zh.jsonl", fake, cache_path=cache, batch_size=2)
    assert [len(c) for c in fake.calls] == [2, 2, 1]  # 5 unique lines, deduplicated, batched by 2
    assert stats == TranslateStats(
        records=3, written=3, flagged=0, lines_translated=5, cache_hits=0, model_calls=3
    )
    a, b, c = load_conversations(tmp_path / "zh.jsonl")
    assert a.messages[0].content == "<image>\n译文"
    assert a.messages[1].content == "译文3 2.5"
    assert b.messages[1].content == "译文`ls -la`\n```\nprint(1)\n```"
    assert b.messages[2].content == "这是中文。"
    assert c.messages[1].content == "译文https://x.org/a"
    assert (tmp_path / "zh.flagged.jsonl").read_text() == ""

    again = FakeTranslator()
    stats = translate_file(source, tmp_path / "zh2.jsonl", again, cache_path=cache, batch_size=2)
    assert again.calls == [] and stats.cache_hits == UNIQUE_LINES
    assert (tmp_path / "zh2.jsonl").read_text() == (tmp_path / "zh.jsonl").read_text()
    other_model = FakeTranslator(cache_id="other")
    translate_file(source, tmp_path / "zh3.jsonl", other_model, cache_path=cache)
    assert sum(map(len, other_model.calls)) == UNIQUE_LINES  # the cache is per model


class Crash(RuntimeError):
    pass


def test_resume_after_a_crash_only_translates_the_rest(tmp_path: Path, source: Path) -> None:
    class CrashAfterOneCall(FakeTranslator):
        def translate_batch(self, texts: Sequence[str]) -> list[str]:
            if self.calls:
                raise Crash
            return super().translate_batch(texts)

    cache = tmp_path / "cache.sqlite"
    with pytest.raises(Crash):
        translate_file(source, tmp_path / "zh.jsonl", CrashAfterOneCall(), cache_path=cache, batch_size=2)
    assert not (tmp_path / "zh.jsonl").exists() and not list(tmp_path.glob("*.tmp"))
    with TranslationCache(cache) as c:
        assert len(c) == 2
    fake = FakeTranslator()
    translate_file(source, tmp_path / "zh.jsonl", fake, cache_path=cache, batch_size=2)
    assert sum(map(len, fake.calls)) == UNIQUE_LINES - 2


def test_lost_placeholders_and_english_output_are_flagged(tmp_path: Path, source: Path) -> None:
    stats = translate_file(
        source, tmp_path / "zh.jsonl", FakeTranslator(drop_placeholders=True), cache_path=tmp_path / "1"
    )
    assert stats.flagged == 3 and stats.written == 0
    rows = [json.loads(line) for line in (tmp_path / "zh.flagged.jsonl").read_text().splitlines()]
    assert rows[0]["id"] == "a" and rows[0]["reasons"] == ["message 1: placeholders lost: [0, 1]"]
    assert rows[0]["source"]["messages"][0]["content"] == "<image>\nHow many cats are there?"
    flagged = tmp_path / "english.jsonl"
    stats = translate_file(
        source,
        tmp_path / "zh2.jsonl",
        FakeTranslator(english=True),
        cache_path=tmp_path / "2",
        flagged_path=flagged,
    )
    assert stats.flagged == 3
    assert "CJK ratio 0.00 < 0.3" in json.loads(flagged.read_text().splitlines()[0])["reasons"][0]


# -- tiny random real architectures -----------------------------------------------------------------


def build_tokenizer(directory: Path, chat_template: str | None = None) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        "How many cats are there?",
        "You are a helpful assistant.",
        "这是一只猫。图片里有三个红色的方块。",
    ]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(directory)
    return len(fast)


@pytest.fixture(scope="module")
def tiny_marian(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import MarianConfig, MarianMTModel

    directory = tmp_path_factory.mktemp("marian")
    vocab = build_tokenizer(directory)
    torch.manual_seed(0)
    config = MarianConfig(
        vocab_size=vocab, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    MarianMTModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    directory = tmp_path_factory.mktemp("qwen2")
    template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    vocab = build_tokenizer(directory, chat_template=template)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.mark.parametrize(("kind", "model_fixture"), [("seq2seq", "tiny_marian"), ("causal", "tiny_qwen2")])
def test_tiny_real_models_batch_cache_and_flag(
    tmp_path: Path, source: Path, kind: str, model_fixture: str, request: pytest.FixtureRequest
) -> None:
    model_dir = request.getfixturevalue(model_fixture)
    translator = load_translator(kind, str(model_dir), max_new_tokens=6)
    generate_calls: list[int] = []
    real_generate = translator.model.generate

    def counting_generate(**kwargs):  # noqa: ANN003, ANN202 - transparent wrapper
        generate_calls.append(kwargs["input_ids"].shape[0])
        return real_generate(**kwargs)

    translator.model.generate = counting_generate
    cache = tmp_path / "cache.sqlite"
    stats = translate_file(source, tmp_path / "zh.jsonl", translator, cache_path=cache, batch_size=2)
    assert generate_calls == [2, 2, 1]
    assert stats.records == 3 and stats.written + stats.flagged == 3
    assert stats.flagged >= 1  # random weights: gibberish gets flagged (placeholders lost / no Chinese)
    generate_calls.clear()
    translate_file(source, tmp_path / "zh2.jsonl", translator, cache_path=cache, batch_size=2)
    assert generate_calls == []
    assert (tmp_path / "zh.flagged.jsonl").read_text() == (tmp_path / "zh2.flagged.jsonl").read_text()
