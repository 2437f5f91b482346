"""The mini Chinese LM: a tiny `Qwen2ForCausalLM` pretrained on the mini world's text, no images.

The tokenizer is `seechat.data.char_tokenizer.build_char_tokenizer` (one token per character, ChatML
template, eos = `<|im_end|>`) over `seechat.mini.scene_text.charset()`, every character any mini world
can write, so stage 2 never meets an unknown character whatever the world's seed. It is saved in
`out_dir/tokenizer`, never next to the model's `config.json`: `AutoTokenizer` on a folder whose
config says `qwen2` picks Qwen's byte-level class, which cannot read a character vocabulary.

Pretraining reads *fresh* rows (`seechat.mini.fresh`): every step draws new scenes, so no row is
seen twice and the LM must learn to read rather than memorise (on a fixed corpus it memorised:
docs/mini-world-results.md). A row is, with `recipe.qa_fraction`, a reading exercise — a detailed
scene description (with each object's ``<box>`` half of the time) followed by 2-6 questions of
every kind the world asks (the seven VQA types, boxes when the description gives them, a one-line
caption, follow-up dialogues) — and otherwise plain text (captions, descriptions) or small talk.
The loss is on the assistant replies + `<|im_end|>` of chat rows (what the LM must learn to do)
and on every token of text rows (what keeps it a language model of the world's Chinese).

Not here: the shared recipe plumbing (`seechat.mini.expert_training`), stage 1/2 training.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, Qwen2Config

from seechat.data.char_tokenizer import build_char_tokenizer
from seechat.mini import scene_text
from seechat.mini.expert_training import (
    PathLike,
    done_marker,
    pair_meta,
    read_jsonl,
    run_atomic,
    torch_threads,
    train_loop,
)
from seechat.mini.fresh import fresh_scenes, step_batches, step_rng
from seechat.mini.scenes import Scene
from seechat.train.plots import plot_score_curve

IGNORE = -100


@dataclass(frozen=True)
class LMRecipe:
    """Mini Chinese LM sizes and optimisation (the shipped LM: `seechat.mini.shipped`)."""

    hidden: int = 256
    layers: int = 6
    heads: int = 8
    kv_heads: int = 4
    intermediate: int = 768
    max_positions: int = 1024  # room for image tokens + a conversation in stage 2 (RoPE: no weights)
    steps: int = 3000  # the shipped LM: 223 s on one H200, shared with the CLIP run
    batch_size: int = 64  # rows (documents) per step, padded to the longest
    qa_fraction: float = 0.8  # share of rows that are description -> questions reading exercises
    box_fraction: float = 0.5  # share of descriptions that give each object's <box>
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 200
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50


Message = tuple[str, str]  # (role, content)


def _question(scene: Scene, rng: random.Random, boxes: bool) -> list[tuple[str, str]]:
    """One exercise about `scene`: a VQA item, a box, a caption or a short follow-up dialogue."""
    kind = rng.choices(("vqa", "grounding", "caption", "dialogue"), weights=(7, 2 if boxes else 0, 1, 1))[0]
    if kind == "grounding" and (g := scene_text.grounding(scene, rng)) is not None:
        return [(scene_text.grounding_instruction(g.expression, rng), g.answer)]
    if kind == "caption":
        return [(scene_text.caption_instruction(rng), scene_text.concise_caption(scene))]
    if kind == "dialogue":
        return scene_text.dialogue(scene, rng)
    qa = scene_text.vqa(scene, rng)
    return (
        [(qa.question, qa.answer)]
        if qa
        else [(scene_text.caption_instruction(rng), scene_text.concise_caption(scene))]
    )


def reading_row(scene: Scene, rng: random.Random, box_fraction: float, turns: int) -> list[Message]:
    """A description of `scene` in the user's first turn, then `turns` exercises about it."""
    boxes = rng.random() < box_fraction
    context = rng.choice(scene_text.DESCRIPTION_CONTEXTS).format(
        d=scene_text.detailed_caption(scene, rng, boxes=boxes)
    )
    pairs: list[tuple[str, str]] = []
    while len(pairs) < turns:
        pairs += _question(scene, rng, boxes)
    messages: list[Message] = []
    for k, (q, a) in enumerate(pairs[:turns]):
        messages += [("user", context + q if k == 0 else q), ("assistant", a)]
    return messages


def text_row(scene: Scene, rng: random.Random) -> str | list[Message]:
    """Plain text about `scene` (a caption or a description), or one exchange of small talk."""
    r = rng.random()
    if r < 0.4:
        return scene_text.concise_caption(scene, rng)
    if r < 0.85:
        return scene_text.detailed_caption(scene, rng, boxes=rng.random() < 0.3)
    q, a = scene_text.chitchat(rng)
    return [("user", q), ("assistant", a)]


def encode_row(row: str | list[Message], tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Token ids and labels of one row: ChatML chat rows supervise the assistant replies and their
    `<|im_end|>`; text rows (text + eos) supervise every token. One token per character (the mini
    tokenizer), looked up directly: tokenizing piece by piece would cost most of a training step."""
    vocab = _char_ids(tokenizer)
    unk = tokenizer.unk_token_id

    def ids_of(s: str) -> list[int]:
        return [vocab.get(c, unk) for c in s]

    if isinstance(row, str):
        ids = ids_of(row) + [tokenizer.eos_token_id]
        return ids, list(ids)
    start, end, newline = vocab["<|im_start|>"], vocab["<|im_end|>"], vocab["\n"]
    ids, labels = [], []
    for role, content in row:
        head, body = [start, *ids_of(role), newline], [*ids_of(content), end]
        ids += head + body + [newline]
        labels += [IGNORE] * len(head) + (body if role == "assistant" else [IGNORE] * len(body)) + [IGNORE]
    return ids, labels


@functools.lru_cache(maxsize=4)
def _char_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """The vocabulary (characters and special tokens) -> id; the mini tokenizer has one id per character."""
    return dict(tokenizer.get_vocab())


def lm_batch(
    recipe: LMRecipe, tokenizer: PreTrainedTokenizerBase, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step `step`'s rows, right-padded: ids (B, L) and labels (B, L) with -100 where unsupervised."""
    rng = step_rng("lm", recipe.seed, step)
    rows = [
        reading_row(s, rng, recipe.box_fraction, rng.randint(2, 6))
        if rng.random() < recipe.qa_fraction
        else text_row(s, rng)
        for s in fresh_scenes(rng, recipe.batch_size)
    ]
    encoded = [encode_row(r, tokenizer) for r in rows]
    width = max(len(i) for i, _ in encoded)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for r, (i, lab) in enumerate(encoded):
        ids[r, : len(i)], labels[r, : len(lab)] = torch.tensor(i), torch.tensor(lab)
    return ids, labels


def lm_config(recipe: LMRecipe, tokenizer: PreTrainedTokenizerBase) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden,
        intermediate_size=recipe.intermediate,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.kv_heads,
        max_position_embeddings=recipe.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


EXAM_SCENES = 100  # the reading exam along the way (`exam_every`): fixed scenes, a stream of their own


def _lm_train(recipe: LMRecipe, out: Path, device: str, workers: int, exam_every: int) -> dict[str, Any]:
    tokenizer = build_char_tokenizer(extra_chars=scene_text.charset())
    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(lm_config(recipe, tokenizer)).to(device).train()
    batches = step_batches(functools.partial(lm_batch, recipe, tokenizer), recipe.steps, workers)
    seen = {"tokens": 0, "supervised": 0}

    def loss_at(step: int) -> torch.Tensor:
        ids, labels = (t.to(device, non_blocking=True) for t in next(batches))
        seen["tokens"] += int((ids != tokenizer.pad_token_id).sum())
        seen["supervised"] += int((labels != IGNORE).sum())
        mask = (ids != tokenizer.pad_token_id).long()
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss  # labels are shifted inside

    exam_rng = random.Random(f"seechat-mini/lm-exam/{recipe.seed}")
    exam = fresh_scenes(exam_rng, EXAM_SCENES) if exam_every else []

    def exam_at(step: int) -> dict[str, Any]:
        """The reading exam of the fixed scenes at every `exam_every`-th step and the last."""
        if not exam or (step % exam_every and step != recipe.steps - 1):
            return {}
        model.eval()
        scores = reading_scores(model, tokenizer, exam)
        model.train()
        return {"exam": scores["qa_exact"], "exam_by_type": scores["qa_exact_by_type"]}

    stats = train_loop("mini-lm", out, list(model.parameters()), recipe, loss_at, log_extra=exam_at)
    plot_score_curve(
        out / "metrics.jsonl", "exam", out / "exam.png", f"mini LM reading exam ({EXAM_SCENES} scenes)"
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to("cpu").eval().half().save_pretrained(out)
    tokenizer.save_pretrained(out / "tokenizer")
    return {
        **stats,
        "tokens_seen": seen["tokens"],
        "supervised_tokens_seen": seen["supervised"],
        "rows_seen": recipe.steps * recipe.batch_size,
        "device": device,
    }


def train_mini_lm(
    out_dir: PathLike,
    recipe: LMRecipe = LMRecipe(),
    *,
    force: bool = False,
    threads: int | None = None,
    device: str = "cpu",
    workers: int = 0,
    exam_every: int = 0,
) -> Path:
    """Pretrain the mini Chinese LM on fresh rows into `out_dir` (returned): fp16 weights there,
    tokenizer in `out_dir/tokenizer` (`LMConfig(path=out, tokenizer_path=out/"tokenizer")`).

    Skipped when `out_dir/done.json` records the same recipe and world generators, unless `force`.
    `workers` background processes build the batches (each is a pure function of the step).
    `exam_every` > 0: every that many steps (a multiple of `recipe.log_every`) and at the last, the
    `reading_exam` of EXAM_SCENES fixed fresh scenes goes into `metrics.jsonl` (`exam`,
    `exam_by_type`): the curve of the skill, not only of the loss. It does not change the weights."""
    out = Path(out_dir)
    if exam_every < 0 or (exam_every and exam_every % recipe.log_every):
        raise ValueError(f"exam_every={exam_every} must be a multiple of log_every={recipe.log_every}")
    with torch_threads(threads):
        return run_atomic(
            out, done_marker(recipe), force, lambda tmp: _lm_train(recipe, tmp, device, workers, exam_every)
        )


# --------------------------------------------------------------------------- evaluation


def split_scenes_of(world: Path, split: str) -> list[Scene]:
    """The ground-truth scenes of a world split, from its pair shards' metadata (key order)."""
    metas = pair_meta(world, split)
    return [Scene.from_dict(metas[k]["scene"]) for k in sorted(metas)]


def reading_exam(scenes: list[Scene], seed: int = 0) -> list[tuple[str, list[Message]]]:
    """Held-out reading items, (type, one-question chat row): for each scene one question of each
    VQA type about its plain description, and one box question about its description with boxes."""
    items: list[tuple[str, list[Message]]] = []
    for n, scene in enumerate(scenes):
        rng = random.Random(f"seechat-mini/reading-exam/{seed}/{n}")
        context = rng.choice(scene_text.DESCRIPTION_CONTEXTS).format(
            d=scene_text.detailed_caption(scene, rng)
        )
        for qtype in scene_text.QUESTION_TYPES:
            if (qa := scene_text.vqa(scene, rng, qtype)) is not None:
                items.append((qtype, [("user", context + qa.question), ("assistant", qa.answer)]))
        if (g := scene_text.grounding(scene, rng)) is not None:
            boxed = rng.choice(scene_text.DESCRIPTION_CONTEXTS).format(
                d=scene_text.detailed_caption(scene, rng, boxes=True)
            )
            items.append(
                (
                    "grounding",
                    [
                        ("user", boxed + scene_text.grounding_instruction(g.expression, rng)),
                        ("assistant", g.answer),
                    ],
                )
            )
    return items


def _nll(
    model: torch.nn.Module, rows: list[tuple[list[int], list[int]]], batch: int = 64
) -> tuple[float, int, list[bool]]:
    """Summed NLL of the supervised tokens (labels != -100) of each row, how many there are, and per
    row whether the greedy next-token prediction is right on all of them (what greedy decoding prints)."""
    total, count, exact = 0.0, 0, []
    device = next(model.parameters()).device
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        width = max(len(ids) for ids, _ in chunk)
        tokens = torch.zeros(len(chunk), width, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, (ids, lab) in enumerate(chunk):
            tokens[r, : len(ids)], labels[r, : len(lab)], mask[r, : len(ids)] = (
                torch.tensor(ids),
                torch.tensor(lab),
                1,
            )
        out = model(input_ids=tokens.to(device), attention_mask=mask.to(device))
        logits = out.logits[:, :-1].float().cpu()  # (b, L-1, V)
        targets = labels[:, 1:]  # (b, L-1): target j is the token at position j + 1
        scored = targets != IGNORE
        nll = F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")  # (b, L-1)
        total += nll[scored].sum().item()
        count += int(scored.sum())
        exact += ((logits.argmax(-1) == targets) | ~scored).all(1).tolist()
    return total, count, exact


@torch.inference_mode()
def evaluate_lm(
    model_dir: PathLike,
    world_root: PathLike,
    split: str = "val",
    *,
    threads: int | None = None,
    limit: int = 0,
) -> dict[str, Any]:
    """How well the LM reads, on a world split's scenes (never in its training rows):

    - `val_ppl`: perplexity over the split's captions (concise references and detailed), text + eos;
    - `qa_exact` / `qa_exact_by_type`: the `reading_exam` — a question of every VQA type about each
      scene's plain description, and a box question (`grounding`) about its description with
      boxes; exact = the greedy prediction gets every reply token right (greedy decoding would
      print exactly the answer and stop); `qa_answer_ppl` over those reply tokens.
    """
    world, model_dir = Path(world_root), Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    captions = read_jsonl(world / split / "captions.jsonl")
    scenes = split_scenes_of(world, split)
    if limit:
        captions, scenes = captions[:limit], scenes[:limit]
    texts = [encode_row(t, tokenizer) for r in captions for t in [*r["references"], r["detailed"]]]
    with torch_threads(threads):
        t_nll, t_n, _ = _nll(model, texts)
        reading = reading_scores(model, tokenizer, scenes)
    return {"val_ppl": math.exp(t_nll / t_n), "val_tokens": t_n, **reading}


@torch.inference_mode()
def reading_scores(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, scenes: list[Scene]) -> dict:
    """The `reading_exam` of `scenes` for a causal LM (any module called with input_ids and
    attention_mask that returns logits, e.g. a stitched model's LoRA-wrapped LM): `qa_exact`
    overall and by type, `qa_answer_ppl`, `n_qa` (see `evaluate_lm`)."""
    exam = reading_exam(scenes)
    q_nll, q_n, exact = _nll(model, [encode_row(row, tokenizer) for _, row in exam])
    by_type: dict[str, list[bool]] = {}
    for (qtype, _), ok in zip(exam, exact, strict=True):
        by_type.setdefault(qtype, []).append(ok)
    return {
        "qa_answer_ppl": math.exp(q_nll / q_n),
        "qa_exact": sum(exact) / len(exact),
        "n_qa": len(exact),
        "qa_exact_by_type": {k: sum(v) / len(v) for k, v in sorted(by_type.items())},
    }
