"""The mini Chinese LM: a tiny `Qwen2ForCausalLM` pretrained on the mini world's text, no images.

The tokenizer is `seechat.mini.tokenizer.build_char_tokenizer` (one token per character, ChatML
template, eos = `<|im_end|>`) over *all* world text — LM corpus, instructions, captions, questions,
answers, alt-text — so stage 2 never meets an unknown character. It is saved in `out_dir/tokenizer`,
never next to the model's `config.json`: `AutoTokenizer` on a folder whose config says `qwen2` picks
Qwen's byte-level class, which cannot read a character vocabulary.

Pretraining reads `text/lm_corpus.jsonl`: `{"messages"}` rows rendered with the chat template,
`{"text"}` rows as text + eos, packed back to back and cut into random fixed-length windows. The
loss is on every token: this is a base model's pretraining, and the user turns (scene descriptions,
questions) are half of the corpus's language — predicting them is what teaches the LM the world's
vocabulary and the ChatML layout. Stage 2 then supervises assistant replies only.

Not here: the shared recipe plumbing (`seechat.mini.expert_common`), stage 1/2 training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, Qwen2Config

from seechat.mini.expert_common import (
    PathLike,
    done_marker,
    read_jsonl,
    run_atomic,
    torch_threads,
    train_loop,
    world_texts,
)
from seechat.mini.tokenizer import build_char_tokenizer


@dataclass(frozen=True)
class LMRecipe:
    """Mini Chinese LM sizes and optimisation; the defaults train in ~80 s on 2 CPU cores."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 384
    max_positions: int = 1024  # room for image tokens + a conversation in stage 2 (RoPE: no weights)
    seq_len: int = 256  # training window over the packed corpus
    steps: int = 280
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10


def lm_documents(rows: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """`{"messages"}` rows rendered with the chat template; `{"text"}` rows as text + eos."""
    return [tokenizer.apply_chat_template(r["messages"], tokenize=False) if "messages" in r
            else r["text"] + tokenizer.eos_token for r in rows]


def _pack(docs: list[str], tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """All documents' ids back to back: (T,) int64."""
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    return torch.tensor([i for doc in ids for i in doc], dtype=torch.long)


def lm_config(recipe: LMRecipe, tokenizer: PreTrainedTokenizerBase) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden, intermediate_size=recipe.intermediate,
        num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads, num_key_value_heads=recipe.kv_heads,
        max_position_embeddings=recipe.max_positions, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def _lm_train(world: Path, recipe: LMRecipe, out: Path) -> dict[str, Any]:
    tokenizer = build_char_tokenizer(world_texts(world))
    stream = _pack(lm_documents(read_jsonl(world / "text" / "lm_corpus.jsonl"), tokenizer), tokenizer)  # (T,)
    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(lm_config(recipe, tokenizer)).train()
    windows = torch.Generator().manual_seed(recipe.seed)
    span = recipe.seq_len + 1

    def loss_at(step: int) -> torch.Tensor:
        starts = torch.randint(0, len(stream) - span, (recipe.batch_size,), generator=windows).tolist()
        batch = torch.stack([stream[s:s + recipe.seq_len] for s in starts])  # (B, L)
        return model(input_ids=batch, labels=batch).loss  # labels are shifted inside the model

    stats = train_loop("mini-lm", out, list(model.parameters()), recipe, loss_at)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out / "tokenizer")
    return {**stats, "corpus_tokens": len(stream),
            "tokens_seen": recipe.steps * recipe.batch_size * recipe.seq_len}


def train_mini_lm(world_root: PathLike, out_dir: PathLike, recipe: LMRecipe = LMRecipe(), *,
                  force: bool = False, threads: int | None = None) -> Path:
    """Pretrain the mini Chinese LM on the world's `text/lm_corpus.jsonl` into `out_dir` (returned):
    weights there, tokenizer in `out_dir/tokenizer` (`LMConfig(path=out, tokenizer_path=out/"tokenizer")`).

    Skipped when `out_dir/done.json` records the same recipe and world, unless `force`.
    """
    world, out = Path(world_root), Path(out_dir)
    with torch_threads(threads):
        return run_atomic(out, done_marker(recipe, world), force, lambda tmp: _lm_train(world, recipe, tmp))


# --------------------------------------------------------------------------- evaluation


def _held_out_rows(world: Path, split: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The split's text in the corpus's two formats: captions as `{"text"}` rows, and its VQA items
    as description-grounded `{"messages"}` (the corpus's QA format, with the detailed caption)."""
    captions = read_jsonl(world / split / "captions.jsonl")
    detailed = {r["image"]: r["detailed"] for r in captions}
    texts = [{"text": t} for r in captions for t in [*r["references"], r["detailed"]]]
    qa = [{"messages": [{"role": "user", "content": f"图片描述：{detailed[r['image']]}\n{r['question']}"},
                        {"role": "assistant", "content": r["answer"]}]}
          for r in read_jsonl(world / split / "vqa.jsonl")]
    return texts, qa


def _nll(model: torch.nn.Module, ids: list[list[int]], first_scored: list[int], batch: int = 64) -> tuple[float, int, int]:
    """Summed NLL of the tokens at positions >= `first_scored[i]` of each row, how many such tokens,
    and how many rows the greedy next-token prediction gets right on all of them."""
    total, count, exact = 0.0, 0, 0
    for i in range(0, len(ids), batch):
        rows, starts = ids[i:i + batch], torch.tensor(first_scored[i:i + batch])
        width = max(map(len, rows))
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, row in enumerate(rows):
            tokens[r, :len(row)], mask[r, :len(row)] = torch.tensor(row), 1
        logits = model(input_ids=tokens, attention_mask=mask).logits[:, :-1].float()  # (b, L-1, V)
        targets = tokens[:, 1:]  # (b, L-1): target j is the token at position j + 1
        scored = mask[:, 1:].bool() & (torch.arange(1, width)[None] >= starts[:, None])
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (b, L-1)
        total += nll[scored].sum().item()
        count += int(scored.sum())
        exact += int(((logits.argmax(-1) == targets) | ~scored).all(1).sum())
    return total, count, exact


@torch.inference_mode()
def evaluate_lm(model_dir: PathLike, world_root: PathLike, split: str = "val", *,
                threads: int | None = None) -> dict[str, float]:
    """Held-out text of the world's `split` (its scenes are not in the LM corpus):

    - `val_ppl`: perplexity over its captions (concise references and detailed), text + eos;
    - `qa_answer_ppl` / `qa_exact`: over its VQA items asked about the detailed caption in the
      corpus's QA format, on the assistant reply + `<|im_end|>` only; exact = the greedy prediction
      gets every reply token right (greedy decoding would print exactly the answer and stop).
    """
    world, model_dir = Path(world_root), Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    texts, qa = _held_out_rows(world, split)
    encode = lambda docs: tokenizer(docs, add_special_tokens=False)["input_ids"]  # noqa: E731
    text_ids, qa_ids = encode(lm_documents(texts, tokenizer)), encode(lm_documents(qa, tokenizer))
    prompts = [tokenizer.apply_chat_template(r["messages"][:1], add_generation_prompt=True, tokenize=False) for r in qa]
    prompt_lens = [len(p) for p in encode(prompts)]
    qa_ids = [row[:-1] for row in qa_ids]  # drop the template's "\n" after the final <|im_end|>
    with torch_threads(threads):
        t_nll, t_n, _ = _nll(model, text_ids, [1] * len(text_ids))
        q_nll, q_n, q_exact = _nll(model, qa_ids, prompt_lens)
    return {"val_ppl": math.exp(t_nll / t_n), "val_tokens": t_n, "qa_answer_ppl": math.exp(q_nll / q_n),
            "qa_exact": q_exact / len(qa), "n_qa": len(qa)}
