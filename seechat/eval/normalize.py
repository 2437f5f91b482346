"""Chinese text normalisation and tokenisation for evaluation.

What this module is: the one place that decides when two Chinese answers or captions are "the
same text" for the metrics in ``seechat.eval`` — full-width → half-width, lower-cased Latin,
Chinese numerals → Arabic digits, punctuation and whitespace handling — and the two caption
tokenisers (``"char"``: one token per Chinese character, one per Latin/digit run; ``"jieba"``:
jieba word segmentation, optional dependency).

What it is not: a general text cleaner for training data, and not NFKC. NFKC also rewrites
``①`` → ``1``, ``m²`` → ``m2``, ``…`` → ``...`` and similar compatibility forms, which changes
answers; here only the full-width ASCII block (U+FF01–U+FF5E), the ideographic space and the
full-width currency signs are folded.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence

__all__ = [
    "TOKENIZERS",
    "arabic_to_chinese",
    "as_tokens",
    "chinese_to_arabic",
    "get_tokenizer",
    "ngram_counts",
    "normalize_answer",
    "normalize_caption",
    "parse_chinese_number",
    "to_halfwidth",
    "tokenize_char",
    "tokenize_jieba",
]

# --- width -------------------------------------------------------------------------------------

_FULLWIDTH_MAP = {code: code - 0xFEE0 for code in range(0xFF01, 0xFF5F)}  # ！..～ -> !..~
_FULLWIDTH_MAP.update({0x3000: 0x20, 0xFFE0: 0xA2, 0xFFE1: 0xA3, 0xFFE5: 0xA5})  # space ￠ ￡ ￥


def to_halfwidth(text: str) -> str:
    """Fold full-width ASCII (``Ａ１，（``), the ideographic space and ``￥`` to half-width."""
    return text.translate(_FULLWIDTH_MAP)


# --- Chinese numerals --------------------------------------------------------------------------

_DIGITS = {
    "零": 0,
    "〇": 0,
    "一": 1,
    "二": 2,
    "两": 2,
    "三": 3,
    "四": 4,
    "五": 5,
    "六": 6,
    "七": 7,
    "八": 8,
    "九": 9,
}
_UNITS = {"十": 10, "百": 100, "千": 1000}
_MYRIAD = {"亿": 100_000_000, "万": 10_000}
_NUMERAL_RUN = re.compile(f"[{''.join(_DIGITS)}{''.join(_UNITS)}{''.join(_MYRIAD)}]+")


def _parse_section(text: str) -> int | None:
    """Parse a numeral below 10000 written with 十百千 (``二十三``, ``一百零五``, ``十二``, ``两千三``)."""
    value, digit, last_unit, saw_zero = 0, None, 10_000, False
    for i, ch in enumerate(text):
        if ch in _DIGITS:
            if digit is not None:  # two digits in a row (三四十) is not a number
                return None
            if _DIGITS[ch] == 0:
                saw_zero = True  # 零 only marks a skipped place (一百零五)
            else:
                digit = _DIGITS[ch]
            continue
        unit = _UNITS[ch]
        if unit >= last_unit:
            return None
        if digit is None:
            if unit != 10 or i != 0:  # only a leading 十 may omit its digit (十二 = 12)
                return None
            digit = 1
        value, digit, last_unit = value + digit * unit, None, unit
    if digit is not None:
        # "两千三" = 2300, "一百五" = 150: a trailing digit right after 百/千 (no 零) is one order down.
        trailing_scale = last_unit // 10 if last_unit in (100, 1000) and not saw_zero else 1
        value += digit * trailing_scale
    return value


def parse_chinese_number(text: str) -> int | None:
    """Parse a whole Chinese numeral (``十二`` → 12, ``两万零三`` → 20003, ``二〇二四`` → 2024).

    Returns None when ``text`` is not a well-formed numeral (``百货``'s ``百``, ``千万``, ``三四十``,
    ``两两``), so idioms that merely contain numeral characters are left alone.
    """
    if not text:
        return None
    if all(ch in _DIGITS for ch in text):
        if len(text) == 1:
            return _DIGITS[text]
        if "两" in text:  # 两 is a quantity word, never a digit of a digit string
            return None
        return int("".join(str(_DIGITS[ch]) for ch in text))  # 二〇二四 style
    for name, scale in _MYRIAD.items():  # largest first: 亿 before 万
        if name in text:
            return _parse_myriad(*text.split(name, 1), scale)
    return _parse_section(text)


def _parse_myriad(head: str, tail: str, scale: int) -> int | None:
    """``head`` × scale + ``tail``, where ``tail`` (< scale) may be 零-prefixed or abbreviated."""
    head_value = parse_chinese_number(head)
    if not head_value or head_value >= scale:
        return None
    if not tail:
        return head_value * scale
    if len(tail) == 1 and tail in _DIGITS and _DIGITS[tail]:  # 三万五 = 35000
        return head_value * scale + _DIGITS[tail] * scale // 10
    tail_value = parse_chinese_number(tail.lstrip("零〇")) if tail.strip("零〇") else 0
    if tail_value is None or tail_value >= scale:
        return None
    return head_value * scale + tail_value


def chinese_to_arabic(text: str) -> str:
    """Replace every well-formed Chinese numeral in ``text`` by Arabic digits (``两个`` → ``2个``)."""

    def replace(match: re.Match[str]) -> str:
        value = parse_chinese_number(match.group())
        return match.group() if value is None else str(value)

    return _NUMERAL_RUN.sub(replace, text)


def arabic_to_chinese(number: int) -> str:
    """Write 0 ≤ number < 10**12 in Chinese numerals (12 → ``十二``, 105 → ``一百零五``)."""
    if not 0 <= number < 10**12:
        raise ValueError(f"arabic_to_chinese supports 0 <= number < 10**12, got {number}")
    if number == 0:
        return "零"
    digits = "零一二三四五六七八九"
    groups = [(number // 10**8, "亿"), (number // 10**4 % 10**4, "万"), (number % 10**4, "")]
    out, need_zero = "", False
    for value, name in groups:
        if value == 0:
            need_zero = bool(out)
            continue
        if out and (need_zero or value < 1000):
            out += "零"
        out += _section_to_chinese(value, digits) + name
        need_zero = False
    if out.startswith("一十"):  # 12 is 十二, not 一十二
        out = out[1:]
    return out


def _section_to_chinese(value: int, digits: str) -> str:
    out, pending_zero = "", False
    for scale, unit in ((1000, "千"), (100, "百"), (10, "十"), (1, "")):
        d = value // scale % 10
        if d == 0:
            pending_zero = bool(out)
            continue
        out += ("零" if pending_zero else "") + digits[d] + unit
        pending_zero = False
    return out


# --- punctuation, case, whitespace -------------------------------------------------------------

_DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\d)")
_KEEP = "\x00"  # placeholder protecting decimal points from punctuation stripping
_EXTRA_SYMBOLS = set("~`^|<>=+$")  # ASCII symbols (category S*) that behave like punctuation here


def _is_punct(ch: str) -> bool:
    return unicodedata.category(ch).startswith("P") or ch in _EXTRA_SYMBOLS


def _replace_punct(text: str, by: str) -> str:
    text = _DECIMAL_POINT.sub(_KEEP, text)  # keep "3.5"; "1,000" loses its comma
    text = "".join(by if _is_punct(ch) else ch for ch in text)
    return text.replace(_KEEP, ".")


def normalize_answer(text: str, *, numerals: bool = True) -> str:
    """Canonical form of a short answer: half-width, lower-case, Chinese numerals as digits, no
    punctuation (either width) and no whitespace. ``"两个。"`` → ``"2个"``, ``"Ｔ恤 "`` → ``"t恤"``."""
    text = to_halfwidth(text).lower()
    if numerals:
        text = chinese_to_arabic(text)
    return "".join(_replace_punct(text, "").split())


def normalize_caption(text: str, *, numerals: bool = True) -> str:
    """Canonical form of a caption before tokenisation: like :func:`normalize_answer` but
    punctuation becomes a space and whitespace runs collapse to one space (Latin words stay apart)."""
    text = to_halfwidth(text).lower()
    if numerals:
        text = chinese_to_arabic(text)
    return " ".join(_replace_punct(text, " ").split())


# --- tokenisers --------------------------------------------------------------------------------

# A Latin/digit run (accented Latin included, decimals kept whole) or any other single character.
_CHAR_TOKEN = re.compile(r"(?:[0-9a-z\u00c0-\u024f]|(?<=\d)\.(?=\d))+|\S")


def tokenize_char(text: str) -> list[str]:
    """Character tokens of the normalised caption: ``"2只红色cat"`` → ``["2", "只", "红", "色", "cat"]``."""
    return _CHAR_TOKEN.findall(normalize_caption(text))


def tokenize_jieba(text: str) -> list[str]:
    """jieba word tokens of the normalised caption (needs ``pip install 'seechat[eval]'``)."""
    try:
        import jieba
    except ImportError as err:  # optional dependency: say how to get it
        raise ImportError(
            "tokenize='jieba' needs jieba: pip install 'seechat[eval]' (or pip install jieba)"
        ) from err
    jieba.setLogLevel(30)  # WARNING: silence the "Building prefix dict" chatter
    return [tok for tok in jieba.lcut(normalize_caption(text)) if tok.strip()]


TOKENIZERS: dict[str, Callable[[str], list[str]]] = {"char": tokenize_char, "jieba": tokenize_jieba}


def get_tokenizer(name: str) -> Callable[[str], list[str]]:
    """Look a tokeniser up in :data:`TOKENIZERS`; unknown names list the valid ones."""
    try:
        return TOKENIZERS[name]
    except KeyError:
        raise ValueError(f"unknown tokenize={name!r}; choose one of {sorted(TOKENIZERS)}") from None


def as_tokens(text: str | Sequence[str], tokenize: str) -> list[str]:
    """Tokenise a string with ``tokenize``; a pre-tokenised list is returned unchanged."""
    return get_tokenizer(tokenize)(text) if isinstance(text, str) else list(text)


def ngram_counts(tokens: Sequence[str], max_n: int) -> Counter[tuple[str, ...]]:
    """Counts of every 1..max_n-gram of ``tokens`` (keys are token tuples)."""
    return Counter(tuple(tokens[i : i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1))
