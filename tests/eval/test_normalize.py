"""Normalisation and tokenisation of Chinese answers and captions."""

from __future__ import annotations

import sys

import pytest

from seechat.eval.normalize import (
    arabic_to_chinese,
    as_tokens,
    chinese_to_arabic,
    get_tokenizer,
    ngram_counts,
    normalize_answer,
    normalize_caption,
    parse_chinese_number,
    to_halfwidth,
    tokenize_char,
    tokenize_jieba,
)


def test_halfwidth_folds_only_the_fullwidth_block():
    assert to_halfwidth("ＡＢｃ１２３，（）！　￥") == "ABc123,()! ¥"
    assert to_halfwidth("①m²…") == "①m²…"  # NFKC would rewrite these; we must not


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("十", 10),
        ("十二", 12),
        ("二十", 20),
        ("一百零五", 105),
        ("一百五", 150),
        ("两千三", 2300),
        ("两万零三", 20003),
        ("三万五", 35000),
        ("二十三万四千五百六十七", 234567),
        ("二〇二四", 2024),
        ("零", 0),
        ("两", 2),
    ],
)
def test_parse_chinese_number(text, value):
    assert parse_chinese_number(text) == value


@pytest.mark.parametrize("text", ["百", "千万", "万一", "三四十", "两两", ""])
def test_non_numerals_are_not_parsed(text):
    assert parse_chinese_number(text) is None


def test_chinese_to_arabic_in_context_keeps_idioms():
    assert chinese_to_arabic("两个苹果和十二只猫在第二十一页") == "2个苹果和12只猫在第21页"
    assert chinese_to_arabic("百货商店千万别去") == "百货商店千万别去"


@pytest.mark.parametrize("number", [0, 7, 10, 12, 20, 105, 110, 1005, 1050, 10001, 12000, 234567, 100000001])
def test_arabic_to_chinese_round_trips(number):
    assert parse_chinese_number(arabic_to_chinese(number)) == number


def test_arabic_to_chinese_spelling():
    assert (arabic_to_chinese(12), arabic_to_chinese(105), arabic_to_chinese(20003)) == (
        "十二",
        "一百零五",
        "二万零三",
    )


def test_normalize_answer():
    assert normalize_answer("两个。") == normalize_answer("２个") == normalize_answer("二个") == "2个"
    assert normalize_answer(" Ｔ-Shirt！") == "tshirt"
    assert normalize_answer("3.5 米") == "3.5米"  # a decimal point survives punctuation stripping
    assert normalize_answer("1,000") == "1000"


def test_normalize_caption_keeps_word_boundaries():
    assert normalize_caption("一只红色的Cat，在 左边！") == "1只红色的cat 在 左边"


def test_char_tokenizer():
    # Chinese characters one token each; Latin/digit runs (and decimals) one token; punctuation gone.
    assert tokenize_char("图中有两只红色Cat，3.5米！") == [
        "图",
        "中",
        "有",
        "2",
        "只",
        "红",
        "色",
        "cat",
        "3.5",
        "米",
    ]


def test_jieba_tokenizer():
    pytest.importorskip("jieba")
    tokens = tokenize_jieba("图中有两只红色的猫。")
    assert "".join(tokens) == "图中有2只红色的猫"
    assert "红色" in tokens


def test_jieba_missing_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "jieba", None)  # makes `import jieba` raise ImportError
    with pytest.raises(ImportError, match=r"seechat\[eval\]"):
        tokenize_jieba("红色")


def test_tokenizer_registry_and_pretokenised_input():
    assert get_tokenizer("char") is tokenize_char
    with pytest.raises(ValueError, match="char"):
        get_tokenizer("whitespace")
    assert as_tokens(["已", "分词"], "char") == ["已", "分词"]


def test_ngram_counts():
    counts = ngram_counts(["a", "a", "b"], 2)
    assert counts == {("a",): 2, ("b",): 1, ("a", "a"): 1, ("a", "b"): 1}
